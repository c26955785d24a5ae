"""Invariants 1-5 of DESIGN.md under random operation sequences (hypothesis state machine).

The machine drives the real BlockPool / BlockManager with Sequences over a tiny alphabet (so
prefix hits are common) and simulates the K/V contents as the token each slot holds, so
"a hashed block holds exactly its chain" and "no write into a shared block" are checkable.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chatpager.engine.block_manager import BlockManager
from chatpager.engine.block_pool import BlockPool
from chatpager.engine.sampling_params import SamplingParams
from chatpager.engine.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 12


class PoolMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.pool = BlockPool(NUM_BLOCKS)
        self.bm = BlockManager(self.pool, BLOCK_SIZE)
        self.live: list[Sequence] = []
        self.contents: dict[int, list[int | None]] = {i: [None] * BLOCK_SIZE for i in range(NUM_BLOCKS)}
        self.chains: dict[int, tuple[int, ...]] = {}  # hash -> the token chain it names
        self.n = 0

    # --- simulated model: computing tokens writes them into their slots ---
    def _compute(self, seq: Sequence, count: int) -> None:
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + count):
            block = seq.blocks[p // BLOCK_SIZE]
            assert block.ref_cnt == 1, "invariant 4: write into a shared block"
            self.contents[block.block_id][p % BLOCK_SIZE] = seq.token_ids[p]
        seq.num_computed_tokens += count
        self.bm.cache_full_blocks(seq)
        for i, h in enumerate(seq.block_hashes[:seq.num_computed_tokens // BLOCK_SIZE]):
            self.chains.setdefault(h, tuple(seq.token_ids[:(i + 1) * BLOCK_SIZE]))

    def _run_copies(self, copies) -> None:
        for src, dst in copies:
            self.contents[dst] = list(self.contents[src])

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def add(self, tokens):
        seq = Sequence(f"s{self.n}", tokens, SamplingParams(), max_len=10**6)
        self.n += 1
        hits = self.bm.match_prefix(seq)
        new = seq.num_tokens - len(hits) * BLOCK_SIZE
        if not self.bm.can_admit(hits, new):
            return
        self.bm.admit(seq, hits)
        copies = self.bm.allocate_slots(seq, new)
        assert copies == []
        self._compute(seq, new)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.append(token)
        copies = self.bm.allocate_slots(seq, 1)
        if copies is None:  # pool exhausted: undo, as a scheduler would preempt instead
            seq.token_ids.pop()
            seq.block_hashes = seq.block_hashes[:seq.num_tokens // BLOCK_SIZE]
            return
        self._run_copies(copies)
        self._compute(seq, 1)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = Sequence(f"s{self.n}", parent.token_ids, SamplingParams(), max_len=10**6)
        self.n += 1
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @invariant()
    def refcounts_match_tables(self):  # invariant 1
        counts = [0] * NUM_BLOCKS
        for s in self.live:
            for b in s.blocks:
                counts[b.block_id] += 1
        assert counts == [b.ref_cnt for b in self.pool.blocks]

    @invariant()
    def free_iff_unreferenced(self):  # invariant 2
        free = {b.block_id for b in self.pool.free_queue}
        assert free == {b.block_id for b in self.pool.blocks if b.ref_cnt == 0}
        assert self.pool.num_free == len(free)

    @invariant()
    def hashed_blocks_hold_their_chain(self):  # invariant 3
        for h, block in self.pool.hash_to_block.items():
            assert block.block_hash == h
            chain = self.chains[h]
            assert self.contents[block.block_id] == list(chain[-BLOCK_SIZE:])

    def teardown(self):  # invariant 5: when every sequence has ended, every block is free
        if not hasattr(self, "live"):
            return
        for s in list(self.live):
            self.bm.free(s)
        assert self.pool.num_free == NUM_BLOCKS


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_lru_evicts_least_recently_freed_and_tail_first():
    pool = BlockPool(4)
    bm = BlockManager(pool, 2)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(), max_len=100)
    bm.admit(seq, [])
    bm.allocate_slots(seq, 8)
    seq.num_computed_tokens = 8
    bm.cache_full_blocks(seq)
    table = seq.block_table
    bm.free(seq)
    # freed tail first: the chain's last block is at the front of the queue (evicted first)
    assert [b.block_id for b in pool.free_queue] == list(reversed(table))
    assert pool.allocate().block_id == table[-1]
    assert pool.evictions == 1
    # the head of the chain is still hittable
    again = Sequence("b", [1, 2, 3, 4, 9], SamplingParams(), max_len=100)
    assert [b.block_id for b in bm.match_prefix(again)] == table[:2]
