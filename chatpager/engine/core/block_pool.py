"""Physical KV block metadata: refcounts, content hashes and the LRU queue of free blocks.

Invariants (tests/engine/core/test_block_pool_properties.py drives random operation sequences against them):
1. `block.ref_cnt` equals the number of live block-table entries pointing at the block.
2. A block is in the free queue iff its ref_cnt is 0.
3. A block with a hash is full and holds exactly the K/V of the token chain the hash names
   (from the end of the step that computes it: blocks are hashed when that step is
   scheduled, and unhashed again if its forward fails); `hash_to_block[h]` is a block whose
   hash is h.
4. A block with `tokens` holds valid K/V for them, at its first len(tokens) slots, after the
   chain named by `parent_key`; it is in the sub-block index under (parent_key, tokens[0]).
   Every hashed block is indexed so (tokens = all of them), and so is the partly filled last
   block of a finished sequence, once nothing references it (nobody can write it then). The
   index lets a prompt reuse a block's leading tokens below block granularity.

Free blocks keep their hash and index entry and stay hittable until reused. The free queue is
a doubly linked list threaded through the Block objects, so take-from-front, append and
remove-from-middle (a cache hit on a free block) are all O(1). Order = eviction order: the
front is the least recently freed block. Callers free a sequence's blocks tail first, so among
blocks freed together the end of a chain (least likely to be shared) is evicted first; blocks
released behind a sliding window go head first (a windowed hit needs a chain's later blocks).
This object never touches tensors.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from chatpager.engine.core.block_keys import BlockKey


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_key", "tokens", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockKey | None = None
        self.parent_key: BlockKey | None = None  # with `tokens`: what the block's slots hold
        self.tokens: tuple[int, ...] | None = None
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self) -> str:
        key = self.block_hash.hex()[:8] if self.block_hash else None
        return f"Block({self.block_id}, ref={self.ref_cnt}, key={key})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed at the front. All ops O(1)."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)  # sentinels: never handed out
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, block: Block) -> None:
        last = self._tail.prev
        last.next, block.prev = block, last
        block.next, self._tail.prev = self._tail, block
        self.size += 1

    def remove(self, block: Block) -> None:
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.size -= 1

    def popleft(self) -> Block:
        if self.size == 0:
            raise RuntimeError("no free blocks")
        block = self._head.next
        self.remove(block)
        return block

    def __contains__(self, block: Block) -> bool:
        return block.prev is not None

    def __iter__(self) -> Iterator[Block]:
        b = self._head.next
        while b is not self._tail:
            yield b
            b = b.next


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.hash_to_block: dict[BlockKey, Block] = {}
        self.by_first_token: dict[tuple[BlockKey, int], dict[Block, None]] = {}  # sub-block index
        self.enable_caching = enable_caching
        self.evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return self.free_queue.size

    def allocate(self) -> Block:
        """Take the least recently used free block; a cached one is forgotten (an eviction)."""
        block = self.free_queue.popleft()
        if block.tokens is not None or block.block_hash is not None:
            self._forget(block)
            self.evictions += 1
        block.ref_cnt = 1
        return block

    def touch(self, block: Block) -> None:
        """Add a reference (prefix hit or fork); revives a free cached block."""
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1

    def take(self, block: Block) -> None:
        """Own a free indexed partial block to write into it: it leaves the cache."""
        if block.ref_cnt != 0 or block.block_hash is not None:
            raise RuntimeError(f"only a free partial block can be taken, not {block}")
        self.free_queue.remove(block)
        self._forget(block)
        block.ref_cnt = 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block, in the order given (pass a chain tail first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"double free of {block}")
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    self._forget(block)
                self.free_queue.append(block)

    def cached_block(self, block_hash: BlockKey) -> Block | None:
        return self.hash_to_block.get(block_hash) if self.enable_caching else None

    def cache(self, block: Block, block_hash: BlockKey, parent_key: BlockKey, tokens: tuple[int, ...]) -> bool:
        """Record that `block` is full and holds (or, within this step, will hold) `tokens`
        after `parent_key`, named by `block_hash`. False if it was not recorded."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.hash_to_block:  # first writer wins; duplicates stay unhashed
            return False
        self._unindex(block)
        block.block_hash = block_hash
        self.hash_to_block[block_hash] = block
        self._index(block, parent_key, tokens)
        return True

    def cache_partial(self, block: Block, parent_key: BlockKey, tokens: tuple[int, ...]) -> None:
        """Record that a free, unhashed block holds `tokens` after `parent_key` in its first slots."""
        if self.enable_caching and tokens and block.ref_cnt == 0 and block.block_hash is None:
            self._unindex(block)
            self._index(block, parent_key, tokens)

    def candidates(self, parent_key: BlockKey, first_token: int) -> Iterable[Block]:
        """Indexed blocks continuing the chain `parent_key` with `first_token`."""
        return self.by_first_token.get((parent_key, first_token), ())

    def uncache(self, block: Block) -> None:
        """`block` does not hold what its hash names (its forward failed): no longer hittable."""
        self._forget(block)

    def _index(self, block: Block, parent_key: BlockKey, tokens: tuple[int, ...]) -> None:
        block.parent_key, block.tokens = parent_key, tokens
        self.by_first_token.setdefault((parent_key, tokens[0]), {})[block] = None

    def _unindex(self, block: Block) -> None:
        if block.tokens is None:
            return
        key = (block.parent_key, block.tokens[0])
        bucket = self.by_first_token.get(key)
        if bucket is not None:
            bucket.pop(block, None)
            if not bucket:
                del self.by_first_token[key]
        block.parent_key = block.tokens = None

    def _forget(self, block: Block) -> None:
        self._unindex(block)
        if block.block_hash is not None and self.hash_to_block.get(block.block_hash) is block:
            del self.hash_to_block[block.block_hash]
        block.block_hash = None

    def num_cached_free(self) -> int:
        """Free blocks whose contents can still be reused (whole or in part)."""
        return sum(1 for b in self.free_queue if b.tokens is not None)
