"""Observation: the counters a user reads (`LLMEngine.stats`) and the immutable CacheSnapshot
the UI draws. Read-only over what an engine shows of itself (`Observed`, which LLMEngine
satisfies: stats never import the engine); the decode rate is the one piece of state kept here,
a sliding window of (time, tokens) per step.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Protocol

from chatpager.engine.config import EngineConfig
from chatpager.engine.core.block_manager import BlockManager
from chatpager.engine.core.block_pool import BlockPool
from chatpager.engine.core.request import Sequence
from chatpager.engine.core.scheduler import Scheduler
from chatpager.engine.outputs import CacheSnapshot, SequenceView

RATE_WINDOW_S = 2.0  # decode tokens/s is averaged over this many recent seconds


class DecodeRate:
    def __init__(self) -> None:
        self._steps: deque[tuple[float, int]] = deque()

    def record(self, tokens: int) -> None:
        now = time.monotonic()
        self._steps.append((now, tokens))
        while self._steps and now - self._steps[0][0] > RATE_WINDOW_S:
            self._steps.popleft()

    def per_second(self) -> float:
        """Tokens per second over the last RATE_WINDOW_S seconds; 0 once the engine is idle."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._steps if now - t <= RATE_WINDOW_S]
        if len(recent) < 2 or now - recent[-1][0] > RATE_WINDOW_S / 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])


class _Counted(Protocol):
    def stats(self) -> dict: ...


class Observed(Protocol):
    """What the counters and snapshots read of an engine."""

    config: EngineConfig
    pool: BlockPool
    block_manager: BlockManager
    scheduler: Scheduler
    seqs: Mapping[str, Sequence]
    step_count: int
    decode_rate: DecodeRate
    recent_cow: Iterable[tuple[int, int]]
    spec: _Counted  # speculation's counters


def engine_stats(engine: Observed) -> dict:
    pool, bm, sched, bs = engine.pool, engine.block_manager, engine.scheduler, engine.config.block_size
    live = [s for s in engine.seqs.values() if s.blocks]
    filled: dict[int, int] = {}
    for s in live:
        for i, b in enumerate(s.blocks[s.num_null_blocks:], start=s.num_null_blocks):
            n = min(bs, max(0, s.num_computed_tokens - i * bs))
            filled[b.block_id] = max(filled.get(b.block_id, 0), n)
    logical = sum(len(s.blocks) - s.num_null_blocks for s in live)
    held = pool.num_blocks - pool.num_free
    q = bm.prefix_query_tokens
    return {
        "num_blocks": pool.num_blocks,
        "block_size": bs,
        "free_blocks": pool.num_free,
        "cached_blocks": pool.num_cached_free(),
        "used_blocks": held,
        "shared_blocks": sum(1 for b in pool.blocks if b.ref_cnt > 1),
        "prefix_query_tokens": q,
        "prefix_hit_tokens": bm.prefix_hit_tokens,
        "prefix_hit_rate": bm.prefix_hit_tokens / q if q else 0.0,
        "evictions": pool.evictions,
        "preemptions": sched.preemptions,
        "swap_outs": sched.swap_outs,
        "swap_ins": sched.swap_ins,
        "cow_copies": bm.cow_copies,
        "window_released_blocks": bm.window_released,
        "kv_utilization": sum(filled.values()) / (len(filled) * bs) if filled else 0.0,
        "sharing_ratio": logical / held if held else 1.0,
        "running": sum(1 for s in sched.running if not s.is_finished),
        "waiting": sum(1 for s in sched.waiting if not s.is_finished),
        "swapped": sum(1 for s in sched.swapped if not s.is_finished),
        "decode_tokens_per_s": engine.decode_rate.per_second(),
        "steps": engine.step_count,
        **engine.spec.stats(),  # spec_proposed_tokens, spec_accepted_tokens, spec_acceptance_rate, ...
    }


def cache_snapshot(engine: Observed) -> CacheSnapshot:
    views = tuple(
        SequenceView(
            request_id=s.request_id, status=s.status.value, num_prompt_tokens=s.num_prompt_tokens,
            num_tokens=s.num_tokens, num_computed_tokens=s.num_computed_tokens,
            num_cached_tokens=s.num_cached_tokens, block_table=tuple(s.block_table),
            parent_id=s.parent_id,
        )
        for s in engine.seqs.values()
    )
    return CacheSnapshot(
        step=engine.step_count,
        block_size=engine.config.block_size,
        refcounts=tuple(b.ref_cnt for b in engine.pool.blocks),
        hashed=tuple(b.block_hash is not None for b in engine.pool.blocks),
        free_order=tuple(b.block_id for b in engine.pool.free_queue),
        sequences=views,
        stats=engine_stats(engine),
        recent_cow=tuple(engine.recent_cow),
    )
