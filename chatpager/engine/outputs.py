"""What the engine reports back: per-request outputs and immutable cache snapshots.

Both are plain frozen records, safe to hand across threads (the UI reads them, never the
engine objects they were taken from).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Sample:
    """One generated continuation (n > 1 gives several per prompt)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """State of one request after a step. token_ids/text hold generated tokens only."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    new_token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    parent_id: str | None = None  # set for forks / parallel samples
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    samples: tuple[Sample, ...] = field(default=())  # LLM.generate with n > 1: all samples


@dataclass(frozen=True, slots=True)
class SequenceView:
    request_id: str
    status: str  # "waiting" | "running" | "swapped" | "finished"
    num_prompt_tokens: int
    num_tokens: int
    num_computed_tokens: int
    num_cached_tokens: int
    block_table: tuple[int, ...]  # NULL_BLOCK (-1): released, outside the sliding window
    parent_id: str | None = None

    @property
    def held_blocks(self) -> tuple[int, ...]:
        """The physical blocks this sequence holds (its table without null entries)."""
        return tuple(b for b in self.block_table if b >= 0)


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """An immutable picture of the block pool and every live sequence's block table."""

    step: int
    block_size: int
    refcounts: tuple[int, ...]  # per physical block
    hashed: tuple[bool, ...]  # per physical block: holds a full, hittable content hash
    free_order: tuple[int, ...]  # free blocks, least recently used (next evicted) first
    sequences: tuple[SequenceView, ...]
    stats: dict
    recent_cow: tuple[tuple[int, int], ...] = ()  # (src, dst) block copies, newest last

    @property
    def num_blocks(self) -> int:
        return len(self.refcounts)
