"""Continuous batching: each step fills a token budget with running sequences (decodes
first, then prefill chunks in progress), swapped-out sequences coming back, and new
admissions from the waiting queue (chunked prefill, prefix cache consulted on admission).

When the pool runs short the scheduler preempts the sequence last in scheduling order (the
newest prefill, else the newest decode): `recompute` frees its blocks (they stay in the prefix
cache, so readmission is mostly hits) and puts it at the front of the waiting queue; `swap`
copies its blocks to host memory first. Nothing new is admitted in a step that preempted.
With a sliding window, allocating a sequence's slots first releases its blocks that fell
behind the window (BlockManager), so a long sequence's room comes back to every step's budget.
Finished and aborted sequences are dropped lazily (status check), so abort is O(1).
No tensors here: a swap goes through `SwapSpace`, which the model's KVCache satisfies.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from chatpager.engine.core.block_manager import BlockManager
from chatpager.engine.core.request import Sequence, Status


class SwapSpace(Protocol):
    """Where a swapped-out sequence's K/V wait (`preemption_mode="swap"`): `swap_out` returns an
    opaque host copy of these blocks, `swap_in` writes such a copy into fresh ones."""

    def swap_out(self, block_ids: list[int]) -> object: ...

    def swap_in(self, host: object, block_ids: list[int]) -> None: ...


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed for each seq this step
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)

    def add(self, seq: Sequence, n: int, copies: list[tuple[int, int]]) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)
        self.copies.extend(copies)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, swap_space: SwapSpace, max_num_seqs: int,
                 max_num_batched_tokens: int, preemption_mode: str) -> None:
        self.bm = block_manager
        self.swap_space = swap_space
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.preemptions = 0
        self.swap_outs = 0  # sequences copied to host memory / back (preemption_mode="swap")
        self.swap_ins = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork joins the running set directly: its blocks are already there."""
        self.running.append(seq)

    def has_room(self) -> bool:
        """Whether one more sequence may run now (max_num_seqs)."""
        return sum(1 for s in self.running if not s.is_finished) < self.max_num_seqs

    def num_unfinished(self) -> int:
        return sum(1 for q in (self.waiting, self.running, self.swapped) for s in q if not s.is_finished)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        live = [s for s in self.running if not s.is_finished]
        decodes = [s for s in live if s.num_tokens - s.num_computed_tokens == 1]
        candidates = deque(decodes + [s for s in live if s.num_tokens - s.num_computed_tokens != 1])
        running: list[Sequence] = []
        preempted = False
        while candidates:
            seq = candidates.popleft()
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:
                running.append(seq)
                continue
            copies = self.bm.allocate_slots(seq, n)
            while copies is None and candidates:
                self._preempt(candidates.pop())
                preempted = True
                copies = self.bm.allocate_slots(seq, n)
            if copies is None:
                self._preempt(seq)
                preempted = True
                break
            batch.add(seq, n, copies)
            running.append(seq)
            budget -= n
        self.running = running
        if not preempted:
            budget = self._swap_in(batch, budget)
        if not preempted and not self.swapped:
            self._admit(batch, budget)
        return batch

    def _swap_in(self, batch: ScheduledBatch, budget: int) -> int:
        while self.swapped and budget > 0:
            seq = self.swapped[0]
            if seq.is_finished:
                self.swapped.popleft()
                continue
            table = self.bm.allocate_fresh(seq)
            if table is None:
                break
            self.swapped.popleft()
            self.swap_space.swap_in(seq.swapped_kv, table)
            self.swap_ins += 1
            seq.swapped_kv = None
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies = self.bm.allocate_slots(seq, n)
            if copies is not None:  # else it runs from the next step on
                batch.add(seq, n, copies)
                budget -= n
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.is_finished:
                self.waiting.popleft()
                continue
            match = self.bm.match_prefix(seq)
            n = min(seq.num_tokens - match.num_tokens(self.bm.block_size), budget)
            if not self.bm.can_admit(match, n):
                break
            self.waiting.popleft()
            copies = self.bm.admit(seq, match)
            copies += self.bm.allocate_slots(seq, n) or []
            seq.status = Status.RUNNING
            batch.add(seq, n, copies)
            self.running.append(seq)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        if self.preemption_mode == "swap" and seq.num_computed_tokens > 0:
            seq.swapped_kv = self.swap_space.swap_out(self.bm.swap_out_table(seq))
            self.swap_outs += 1
            self.bm.free(seq)
            seq.status = Status.SWAPPED
            self.swapped.append(seq)
            return
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
