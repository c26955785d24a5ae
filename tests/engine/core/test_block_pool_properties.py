"""Invariants 1-5 of docs/ARCHITECTURE.md under random operation sequences (hypothesis state machine).

The machine drives the real BlockPool / BlockManager with Sequences over a tiny alphabet (so
prefix hits are common) and simulates the K/V contents as the token each slot holds, so
"a hashed block holds exactly its chain", "no write into a shared block" and "every
sequence reads its own tokens" are checkable. Work is grouped into steps as the engine does:
admissions and appends schedule tokens (their blocks become hittable at once, so later
admissions of the same step share them), then the step either computes — all copies, then
all writes, then all reads — or fails, and nothing it registered stays hittable. Sequences
are also swapped out and back in (their K/V travels through "host memory").
The same machine runs with a sliding window: blocks before a sequence's window are released
(null entries, never written, never read), reads cover only the window, prefix hits need
only the blocks inside it, and a sequence appending one token holds at most
cdiv(W, block_size) + 1 blocks.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chatpager.engine.core.block_manager import BlockManager, cdiv
from chatpager.engine.core.block_pool import BlockPool
from chatpager.engine.core.request import Sequence
from chatpager.engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 12


class PoolMachine(RuleBasedStateMachine):
    WINDOW: int | None = None

    @initialize()
    def setup(self) -> None:
        self.pool = BlockPool(NUM_BLOCKS)
        self.bm = BlockManager(self.pool, BLOCK_SIZE, sliding_window=self.WINDOW)
        self.live: list[Sequence] = []
        self.swapped: list[tuple[Sequence, list[list[int | None]]]] = []  # with their host copy
        self.contents: dict[int, list[int | None]] = {i: [None] * BLOCK_SIZE for i in range(NUM_BLOCKS)}
        self.chains: dict[bytes, tuple[int, ...]] = {}  # hash -> the token chain it names
        self.salts: dict[bytes, str | None] = {}  # hash -> the cache salt of the chain
        self.scheduled: list[tuple[Sequence, int]] = []  # this step: (sequence, tokens to compute)
        self.copies: list[tuple[int, int]] = []
        self.n = 0

    def _schedule(self, seq: Sequence, count: int, copies) -> None:
        self.scheduled.append((seq, count))
        self.copies.extend(copies)
        for i, h in enumerate(seq.block_hashes[:(seq.num_computed_tokens + count) // BLOCK_SIZE]):
            self.chains.setdefault(h, tuple(seq.token_ids[:(i + 1) * BLOCK_SIZE]))
            self.salts.setdefault(h, seq.cache_salt)

    def _idle(self) -> list[Sequence]:
        busy = {id(s) for s, _ in self.scheduled}
        return [s for s in self.live if id(s) not in busy]

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14), salt=st.sampled_from([None, "t"]))
    def add(self, tokens, salt):
        seq = Sequence(f"s{self.n}", tokens, SamplingParams(), max_len=10**6, cache_salt=salt)
        self.n += 1
        match = self.bm.match_prefix(seq)
        assert match.skipped == 0 or self.WINDOW  # without a window a hit is a chain from the start
        for i, block in enumerate(match.blocks, start=match.skipped):  # the same chain, salt included
            assert self.chains[block.block_hash] == tuple(tokens[:(i + 1) * BLOCK_SIZE])
            assert self.salts[block.block_hash] == salt
        reused = match.num_tokens(BLOCK_SIZE)
        assert reused < len(tokens)  # the last token is always computed
        new = seq.num_tokens - reused
        if not self.bm.can_admit(match, new):
            return
        copies = self.bm.admit(seq, match)
        more = self.bm.allocate_slots(seq, new)
        assert more == []  # a fresh sequence never writes a shared block
        self._schedule(seq, new, copies)
        self.live.append(seq)

    @precondition(lambda self: self._idle())
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(self._idle()))
        seq.token_ids.append(token)
        copies = self.bm.allocate_slots(seq, 1)
        if copies is None:  # pool exhausted: undo, as a scheduler would preempt instead
            seq.token_ids.pop()
            seq.block_hashes = seq.block_hashes[:seq.num_tokens // BLOCK_SIZE]
            return
        if self.WINDOW:  # a decoding sequence holds a window's worth of blocks, whatever its length
            assert len(seq.blocks) - seq.num_null_blocks <= cdiv(self.WINDOW, BLOCK_SIZE) + 1
        self._schedule(seq, 1, copies)

    @precondition(lambda self: self.scheduled)
    @rule()
    def compute(self):
        """One forward: block copies, then every K/V write, then every attention read."""
        for src, dst in self.copies:
            self.contents[dst] = list(self.contents[src])
        for seq, count in self.scheduled:
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + count):
                block = seq.blocks[p // BLOCK_SIZE]
                assert block is not None, "a write into a released (null) entry"
                # invariant 4: a shared block is only written with the very chain its hash names
                # (a same-step hit by another request), never with anything else
                if block.ref_cnt > 1:
                    assert block.block_hash is not None
                    assert self.chains[block.block_hash][p] == seq.token_ids[p]
                self.contents[block.block_id][p % BLOCK_SIZE] = seq.token_ids[p]
        for seq, count in self.scheduled:
            # what this step's queries read: from the first one's window on (all, without a window)
            first = max(0, seq.num_computed_tokens - self.WINDOW + 1) if self.WINDOW else 0
            seq.num_computed_tokens += count
            context = [self.contents[seq.blocks[p // BLOCK_SIZE].block_id][p % BLOCK_SIZE]
                       for p in range(first, seq.num_computed_tokens)]
            assert context == seq.token_ids[first:seq.num_computed_tokens], "read another chain's K/V"
        self.bm.end_step(computed=True)
        self.scheduled, self.copies = [], []

    @precondition(lambda self: self.scheduled)
    @rule()
    def fail(self):
        """The forward raised: nothing was written; the engine ends the requests of the batch."""
        self.bm.end_step(computed=False)
        for seq, _ in self.scheduled:
            self.live.remove(seq)
            self.bm.free(seq, keep_tail=False)
        self.scheduled, self.copies = [], []

    @precondition(lambda self: self.live and not self.scheduled)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = Sequence(f"s{self.n}", parent.token_ids, SamplingParams(), max_len=10**6,
                         cache_salt=parent.cache_salt)
        self.n += 1
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: any(s.num_computed_tokens for s in self.live) and not self.scheduled)
    @rule(data=st.data())
    def swap_out(self, data):
        """Preemption by swapping: the K/V its next queries read go to host memory."""
        seq = data.draw(st.sampled_from([s for s in self.live if s.num_computed_tokens]))
        host = [list(self.contents[b]) for b in self.bm.swap_out_table(seq)]
        self.bm.free(seq)
        self.live.remove(seq)
        self.swapped.append((seq, host))

    @precondition(lambda self: self.swapped and not self.scheduled)
    @rule()
    def swap_in(self):
        seq, host = self.swapped[0]
        table = self.bm.allocate_fresh(seq)
        if table is None:
            return
        assert len(table) == len(host)
        for block_id, slots in zip(table, host):
            self.contents[block_id] = list(slots)
        self.swapped.pop(0)
        self.live.append(seq)

    @precondition(lambda self: self.live and not self.scheduled)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @invariant()
    def refcounts_match_tables(self):  # invariant 1
        counts = [0] * NUM_BLOCKS
        for s in self.live:
            for b in s.blocks[s.num_null_blocks:]:
                counts[b.block_id] += 1
        assert counts == [b.ref_cnt for b in self.pool.blocks]
        for s, _ in self.swapped:
            assert s.blocks == []

    @invariant()
    def nulls_are_a_leading_run_behind_the_window(self):
        for s in self.live:
            k = s.num_null_blocks
            assert all(b is None for b in s.blocks[:k]) and all(b is not None for b in s.blocks[k:])
            assert k == 0 or (self.WINDOW and k * BLOCK_SIZE <= s.num_computed_tokens - self.WINDOW + 1)

    @invariant()
    def free_iff_unreferenced(self):  # invariant 2
        free = {b.block_id for b in self.pool.free_queue}
        assert free == {b.block_id for b in self.pool.blocks if b.ref_cnt == 0}
        assert self.pool.num_free == len(free)

    @invariant()
    def hashed_blocks_hold_their_chain(self):  # invariant 3, between steps
        if self.scheduled:
            return
        for h, block in self.pool.hash_to_block.items():
            assert block.block_hash == h
            chain = self.chains[h]
            assert self.contents[block.block_id] == list(chain[-BLOCK_SIZE:])

    @invariant()
    def indexed_blocks_hold_their_tokens(self):  # sub-block reuse: what the index promises
        if self.scheduled:
            return
        indexed = [b for bucket in self.pool.by_first_token.values() for b in bucket]
        assert len(indexed) == len({b.block_id for b in indexed})
        for block in indexed:
            assert (block.parent_key, block.tokens[0]) in self.pool.by_first_token
            assert self.contents[block.block_id][:len(block.tokens)] == list(block.tokens)
            if block.block_hash is None:  # a finished sequence's tail: free, so nobody writes it
                assert block.ref_cnt == 0 and len(block.tokens) < BLOCK_SIZE

    def teardown(self):  # invariant 5: when every sequence has ended, every block is free
        if not hasattr(self, "live"):
            return
        self.bm.end_step(computed=not self.scheduled)
        for s in list(self.live):
            self.bm.free(s)
        assert self.pool.num_free == NUM_BLOCKS


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class WindowedPoolMachine(PoolMachine):
    WINDOW = 6  # not a multiple of the block size: the window's first block is partly visible


TestWindowedPool = WindowedPoolMachine.TestCase
TestWindowedPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_lru_evicts_least_recently_freed_and_tail_first():
    pool = BlockPool(4)
    bm = BlockManager(pool, 2)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(), max_len=100)
    bm.admit(seq, bm.match_prefix(seq))
    bm.allocate_slots(seq, 8)
    bm.end_step(computed=True)
    seq.num_computed_tokens = 8
    table = seq.block_table
    bm.free(seq)
    # freed tail first: the chain's last block is at the front of the queue (evicted first)
    assert [b.block_id for b in pool.free_queue] == list(reversed(table))
    assert pool.allocate().block_id == table[-1]
    assert pool.evictions == 1
    # the head of the chain is still hittable
    again = Sequence("b", [1, 2, 3, 4, 9], SamplingParams(), max_len=100)
    assert [b.block_id for b in bm.match_prefix(again).blocks] == table[:2]


def test_blocks_scheduled_in_a_step_are_hittable_in_that_step_and_dropped_if_it_fails():
    pool = BlockPool(8)
    bm = BlockManager(pool, 2)
    first = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(), max_len=100)
    bm.admit(first, bm.match_prefix(first))
    bm.allocate_slots(first, 5)  # scheduled, not yet computed
    second = Sequence("b", [1, 2, 3, 4, 6], SamplingParams(), max_len=100)
    match = bm.match_prefix(second)
    assert match.blocks == first.blocks[:2] and match.partial is None  # (block 3 is not written yet)
    bm.admit(second, match)
    assert [b.ref_cnt for b in first.blocks] == [2, 2, 1]
    bm.end_step(computed=False)  # the forward failed: its blocks were never written
    assert not pool.hash_to_block
    assert bm.match_prefix(Sequence("c", [1, 2, 3, 4, 7], SamplingParams(), max_len=100)).blocks == []
