"""Per-sequence block bookkeeping on top of the BlockPool: prefix matching, slot allocation
with copy-on-write, hashing blocks as they fill, fork and free.

Hash chain: a full block's key = SHA-256(parent key, its token ids), the first block's parent
being a root key over the extra keys (model identity, the request's cache salt), so equal keys
name equal token chains under equal extra keys (see block_keys.py).
Copy-on-write: the only block a step can write into that already holds tokens is the
sequence's partly filled last block; if it is shared (refcount > 1, after a fork), it is
replaced by a fresh copy first. Full blocks are never written again.
"""
from __future__ import annotations

from functools import lru_cache

from chatpager.engine.block_keys import BlockKey, block_key, root_key
from chatpager.engine.block_pool import Block, BlockPool
from chatpager.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, model_key: str | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.model_key = model_key
        self.cow_copies = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self._registered_this_step: list[Block] = []  # hittable before their K/V are written

    # --- hashing -------------------------------------------------------------------------
    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Make seq.block_hashes cover its first `num_full_blocks` full blocks."""
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else self.root(seq)
            hashes.append(block_key(parent, tokens[i * bs:(i + 1) * bs]))

    def root(self, seq: Sequence) -> BlockKey:
        return _root(self.model_key, seq.cache_salt)

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Make every block that is full once `num_tokens` tokens are computed hittable now:
        within a forward every K/V write precedes every attention read, so a request that
        hits them in this step reads them after they are written."""
        full = num_tokens // self.block_size
        self._extend_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            if self.pool.cache(seq.blocks[i], seq.block_hashes[i]):
                self._registered_this_step.append(seq.blocks[i])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def end_step(self, computed: bool) -> None:
        """After the forward: if it failed, the blocks registered for it hold no K/V, so they
        stop being hittable (every request that hit them was in that forward and fails too)."""
        if not computed:
            for block in self._registered_this_step:
                self.pool.uncache(block)
        self._registered_this_step = []

    # --- admission -----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[Block]:
        """Longest chain of cached full blocks; the last token is always left to compute."""
        if not self.pool.enable_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hits: list[Block] = []
        for h in seq.block_hashes[:max_blocks]:
            block = self.pool.cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, hits: list[Block], num_new_tokens: int) -> bool:
        new_blocks = cdiv(len(hits) * self.block_size + num_new_tokens, self.block_size) - len(hits)
        revived = sum(1 for b in hits if b.ref_cnt == 0)  # hits that sit in the free queue
        return new_blocks + revived <= self.pool.num_free

    def admit(self, seq: Sequence, hits: list[Block]) -> None:
        for b in hits:
            self.pool.touch(b)
        seq.blocks = list(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        if not seq.admitted:
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            seq.admitted = True

    # --- growth --------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Blocks for the next `num_new_tokens` tokens, which this step computes: the blocks
        they fill become hittable at once. Returns block copies to run before the forward
        (copy-on-write), or None, changing nothing, if the pool is too short."""
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
        self._register_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)
        return copies

    def allocate_fresh(self, seq: Sequence, num_blocks: int) -> bool:
        """Fresh blocks for a swapped-out sequence coming back (its K/V is copied in after)."""
        if num_blocks > self.pool.num_free:
            return False
        seq.blocks = [self.pool.allocate() for _ in range(num_blocks)]
        seq.num_registered_blocks = 0  # fresh copies: register them again as they are confirmed
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for b in parent.blocks:
            self.pool.touch(b)
        child.blocks = list(parent.blocks)
        child.num_registered_blocks = parent.num_registered_blocks

    def free(self, seq: Sequence) -> None:
        self.pool.free(reversed(seq.blocks))  # tail first: evicted before the shared head
        seq.blocks = []
        seq.num_registered_blocks = 0


@lru_cache(maxsize=1024)  # one entry per (model, tenant) in use
def _root(model_key: str | None, cache_salt: str | None) -> BlockKey:
    return root_key(model_key, cache_salt)
