"""Per-sequence block bookkeeping on top of the BlockPool: prefix matching, slot allocation
with copy-on-write, hashing blocks as they fill, fork and free.

Hash chain: a full block's key = SHA-256(parent key, its token ids), the first block's parent
being a root key over the extra keys (model identity, the request's cache salt and LoRA
adapter), so equal keys name equal token chains under equal extra keys (see block_keys.py).
Matching on admission: the longest chain of cached full blocks, then, below block
granularity, the indexed block after that chain sharing the most leading tokens with the
prompt (a cached full block that diverges midway, or the partly filled last block of a
finished turn). That block's valid slots are reused: taken if it is a free partial block,
else copied (the copy runs before the forward). The prompt's last token is always computed.
Copy-on-write: the only block a step can write into that already holds tokens is the
sequence's partly filled last block; if it is shared (refcount > 1, after a fork), it is
replaced by a fresh copy first. Full blocks are never written again, except by the step
that computes them, which a same-step hit shares (it expects exactly those K/V).
Sliding window (W, the same for every layer; a model with any full-attention layer has none
here): blocks wholly before the window of a sequence's next token are never read again, so
each step releases them first (their table entries become null, see request.py; a cached
one goes to the free queue, head first, and stays hittable; a shared one stays with its
other holders). A sequence then holds at most cdiv(W - 1 + n, block_size) + 1 blocks in a
step that computes n of its tokens: cdiv(W, block_size) + 1 while decoding, whatever its
length; a long prompt is bounded by its prefill chunk (max_num_batched_tokens), recompute
after preemption included.
A block's key names its whole token chain, so its K/V (which depend on everything before,
through the layers) are right wherever it is found: a windowed prefix hit needs only the
chain's blocks inside the window of the first token left to compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from chatpager.engine.core.block_keys import block_key, BlockKey, root_key
from chatpager.engine.core.block_pool import Block, BlockPool
from chatpager.engine.core.request import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class PrefixMatch:
    """What admission can reuse: whole cached blocks, then maybe the leading slots of one more."""

    blocks: list[Block] = field(default_factory=list)
    partial: Block | None = None
    partial_tokens: int = 0
    skipped: int = 0  # leading blocks of the chain not needed (before the window): null entries

    def num_tokens(self, block_size: int) -> int:
        return (self.skipped + len(self.blocks)) * block_size + self.partial_tokens


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, model_key: str | None = None,
                 sliding_window: int | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.model_key = model_key
        self.window = sliding_window
        self.cow_copies = 0
        self.window_released = 0  # blocks released for falling outside the sliding window
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self._registered_this_step: list[Block] = []  # hittable before their K/V are written

    # --- hashing -------------------------------------------------------------------------
    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Make seq.block_hashes cover its first `num_full_blocks` full blocks."""
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        for i in range(len(hashes), num_full_blocks):
            hashes.append(block_key(self._parent_key(seq, i), tokens[i * bs:(i + 1) * bs]))

    def root(self, seq: Sequence) -> BlockKey:
        return _root(self.model_key, seq.cache_salt, seq.params.lora)

    def _parent_key(self, seq: Sequence, i: int) -> BlockKey:
        """The key that block `i` of `seq` continues: block i-1's, or the root for the first.
        Needs seq.block_hashes to cover the first i blocks."""
        return seq.block_hashes[i - 1] if i else self.root(seq)

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Make every block that is full once `num_tokens` tokens are computed hittable now:
        within a forward every K/V write precedes every attention read, so a request that
        hits them in this step reads them after they are written."""
        full = num_tokens // self.block_size
        self._extend_hashes(seq, full)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block = seq.blocks[i]
            if block is not None and self.pool.cache(block, seq.block_hashes[i], self._parent_key(seq, i), tokens):
                self._registered_this_step.append(block)
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def end_step(self, computed: bool) -> None:
        """After the forward: if it failed, the blocks registered for it hold no K/V, so they
        stop being hittable (every request that hit them was in that forward and fails too)."""
        if not computed:
            for block in self._registered_this_step:
                self.pool.uncache(block)
        self._registered_this_step = []

    # --- admission -----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Longest reusable prefix; the last token is always left to compute."""
        match = PrefixMatch()
        if not self.pool.enable_caching:
            return match
        bs, limit = self.block_size, seq.num_tokens - 1
        self._extend_hashes(seq, limit // bs)
        if self.window:
            self._match_window(seq, limit // bs, match)
        else:
            for h in seq.block_hashes[:limit // bs]:
                block = self.pool.cached_block(h)
                if block is None:
                    break
                match.blocks.append(block)
        full = match.skipped + len(match.blocks)
        start = full * bs
        want = seq.token_ids[start:min(start + bs, limit)]
        if not want:
            return match
        parent = self._parent_key(seq, full)
        pending = {b.block_id for b in self._registered_this_step}  # K/V not written yet: no copy
        for block in self.pool.candidates(parent, want[0]):
            if block.block_id in pending:
                continue
            n = _common_prefix(block.tokens, want)
            if n > match.partial_tokens:
                match.partial, match.partial_tokens = block, n
        return match

    def _match_window(self, seq: Sequence, num_full: int, match: PrefixMatch) -> None:
        """The most full blocks `k` of seq's chain that can be reused under the window: those
        of blocks first_needed(k * bs) .. k - 1 must all be cached; earlier ones need not be."""
        best, run = 0, 0  # run: cached blocks ending at the current one
        for i, h in enumerate(seq.block_hashes[:num_full]):
            run = run + 1 if self.pool.cached_block(h) is not None else 0
            if run and run >= i + 1 - self._first_needed((i + 1) * self.block_size):
                best = i + 1
        match.skipped = self._first_needed(best * self.block_size)
        match.blocks = [self.pool.cached_block(h) for h in seq.block_hashes[match.skipped:best]]

    def can_admit(self, match: PrefixMatch, num_new_tokens: int) -> bool:
        full = match.skipped + len(match.blocks)
        new_blocks = cdiv(match.num_tokens(self.block_size) + num_new_tokens, self.block_size) - full
        revived = sum(1 for b in match.blocks if b.ref_cnt == 0)  # hits that sit in the free queue
        if match.partial is not None and match.partial.ref_cnt == 0 and match.partial.block_hash is not None:
            revived += 1  # a free full block copied from is held while its copy is allocated
        return new_blocks + revived <= self.pool.num_free

    def admit(self, seq: Sequence, match: PrefixMatch) -> list[tuple[int, int]]:
        """Give `seq` the matched blocks; returns block copies to run before the forward."""
        for b in match.blocks:
            self.pool.touch(b)
        seq.blocks = [None] * match.skipped + match.blocks
        seq.num_null_blocks = match.skipped
        copies = []
        src = match.partial
        if src is not None:
            if src.ref_cnt == 0 and src.block_hash is None:  # a finished turn's tail: take it
                self.pool.take(src)
                seq.blocks.append(src)
            else:  # still in use, or a cached full block worth keeping: copy its slots
                self.pool.touch(src)  # so allocating the copy cannot evict the source
                dst = self.pool.allocate()
                self.pool.free([src])
                seq.blocks.append(dst)
                copies.append((src.block_id, dst.block_id))
        seq.num_registered_blocks = match.skipped + len(match.blocks)
        seq.num_computed_tokens = match.num_tokens(self.block_size)
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        if not seq.admitted:
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            seq.admitted = True
        return copies

    # --- growth --------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Blocks for the next `num_new_tokens` tokens, which this step computes: the blocks
        they fill become hittable at once. Returns block copies to run before the forward
        (copy-on-write), or None, allocating nothing, if the pool is too short. Blocks before
        the window of the first new token are released first, either way."""
        self.release_outside_window(seq)
        bs = self.block_size
        need = cdiv(seq.num_computed_tokens + num_new_tokens, bs) - len(seq.blocks)
        idx = seq.num_computed_tokens // bs
        cow = seq.num_computed_tokens % bs != 0 and seq.blocks[idx].ref_cnt > 1
        if max(need, 0) + cow > self.pool.num_free:
            return None
        copies: list[tuple[int, int]] = []
        if cow:
            old, new = seq.blocks[idx], self.pool.allocate()
            self.pool.free([old])
            seq.blocks[idx] = new
            copies.append((old.block_id, new.block_id))
            self.cow_copies += 1
        for _ in range(need):
            seq.blocks.append(self.pool.allocate())
        # proposed tokens may be rejected: their blocks become hittable only once accepted
        self._register_full_blocks(seq, min(seq.num_computed_tokens + num_new_tokens,
                                            seq.num_tokens - seq.num_spec_tokens))
        return copies

    # --- sliding window --------------------------------------------------------------------
    def _first_needed(self, position: int) -> int:
        """How many leading blocks no query at `position` or later reads: those wholly before
        its window (it sees position - W + 1 .. position). 0 without a window."""
        if not self.window:
            return 0
        return max(0, position - self.window + 1) // self.block_size

    def max_blocks_held(self, max_step_tokens: int) -> int | None:
        """The most blocks one sequence holds at a time when a step computes at most
        `max_step_tokens` of its tokens: bounded by the window, else None (its whole length)."""
        if not self.window:
            return None
        return cdiv(self.window - 1 + max_step_tokens, self.block_size) + 1

    def release_outside_window(self, seq: Sequence) -> None:
        """Release the blocks before the window of seq's next token: null entries from now on."""
        first = self._first_needed(seq.num_computed_tokens)
        if first <= seq.num_null_blocks:
            return
        dead = seq.blocks[seq.num_null_blocks:first]
        seq.blocks[seq.num_null_blocks:first] = [None] * len(dead)
        seq.num_null_blocks = first
        # head first, so evicted first: a windowed hit needs the blocks just before its first new
        # token, and the likeliest next prompt (a chat's next turn) continues this one's end
        self.pool.free(dead)
        self.window_released += len(dead)

    # --- swap and fork -------------------------------------------------------------------
    def swap_out_table(self, seq: Sequence) -> list[int]:
        """The blocks a swap-out copies to host memory: those of seq's computed tokens that
        its next queries read (blocks before the window are released instead)."""
        self.release_outside_window(seq)
        return seq.block_table[seq.num_null_blocks:cdiv(seq.num_computed_tokens, self.block_size)]

    def allocate_fresh(self, seq: Sequence) -> list[int] | None:
        """Fresh blocks where `swap_out_table` took seq's K/V from (it is copied in after);
        their ids, or None, allocating nothing, unless the pool also keeps room for the block
        its next token may open."""
        first = self._first_needed(seq.num_computed_tokens)
        count = cdiv(seq.num_computed_tokens, self.block_size) - first
        if count + 1 > self.pool.num_free:
            return None
        fresh = [self.pool.allocate() for _ in range(count)]
        seq.blocks = [None] * first + fresh
        seq.num_null_blocks = first
        seq.num_registered_blocks = 0  # fresh copies: register them again as they are confirmed
        return [b.block_id for b in fresh]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block `parent` holds; parent's nulls are the child's too."""
        for b in parent.blocks[parent.num_null_blocks:]:
            self.pool.touch(b)
        child.blocks = list(parent.blocks)
        child.num_null_blocks = parent.num_null_blocks
        child.num_registered_blocks = parent.num_registered_blocks

    def free(self, seq: Sequence, keep_tail: bool = True) -> None:
        """Release `seq`'s blocks, tail first (evicted before the shared head). With `keep_tail`,
        a partly filled last block that nobody else holds stays findable by its tokens, so
        the next turn of a chat reuses it; pass False when the K/V may be incomplete (a failed
        forward: its block copies may not have run)."""
        bs, computed = self.block_size, seq.num_computed_tokens
        full = computed // bs
        tail = seq.blocks[full] if keep_tail and computed % bs and len(seq.blocks) > full else None
        self.pool.free(reversed(seq.blocks[seq.num_null_blocks:]))
        if tail is not None and tail.ref_cnt == 0 and tail.block_hash is None:
            self._extend_hashes(seq, full)
            self.pool.cache_partial(tail, self._parent_key(seq, full), tuple(seq.token_ids[full * bs:computed]))
        seq.blocks = []
        seq.num_null_blocks = 0
        seq.num_registered_blocks = 0

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Forget every slot from `num_tokens` on (rejected speculative tokens): blocks that held
        only such slots go back to the pool. They were never registered (allocate_slots waits
        for acceptance), so nothing hittable names their contents."""
        keep = cdiv(num_tokens, self.block_size)
        dropped, seq.blocks = seq.blocks[keep:], seq.blocks[:keep]
        self.pool.free(reversed(dropped))
        del seq.block_hashes[num_tokens // self.block_size:]


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@lru_cache(maxsize=1024)  # one entry per (model, tenant, LoRA adapter) in use
def _root(model_key: str | None, cache_salt: str | None, lora: str | None) -> BlockKey:
    return root_key(model_key, cache_salt, lora)
