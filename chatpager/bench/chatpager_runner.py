"""Run the workload on chatpager's step API, as a chat server would see it.

Every session's first turn is submitted at the start; a session's next turn (its whole
history, re-encoded with the chat template) is submitted as soon as its previous reply
finishes, so prefix caching has to find the history in the pool. After every step the
engine's counters are sampled (KV utilization, blocks in use, sharing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from chatpager.bench.results import RunResult, TurnRecord
from chatpager.bench.workload import Session, WorkloadSpec
from chatpager.engine.sampling_params import SamplingParams

Progress = Callable[[int], None]  # called with the number of turns just finished
COUNTERS = ("prefix_query_tokens", "prefix_hit_tokens", "evictions", "preemptions", "cow_copies")


@dataclass(slots=True)
class EngineTrace:
    """Per-step samples of the engine's stats, and counters over the run."""

    t: list[float] = field(default_factory=list)
    kv_utilization: list[float] = field(default_factory=list)
    used_blocks: list[int] = field(default_factory=list)
    sharing_ratio: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    num_blocks: int = 0
    block_size: int = 0
    counters: dict[str, int] = field(default_factory=dict)  # deltas over the run
    stats_s: float = 0.0  # time spent sampling stats (inside the wall time)

    def sample(self, t: float, stats: dict) -> None:
        self.t.append(t)
        self.used_blocks.append(stats["used_blocks"])
        self.running.append(stats["running"])
        self.sharing_ratio.append(stats["sharing_ratio"])
        self.kv_utilization.append(stats["kv_utilization"])


def reply_text(tokenizer, output_ids: list[int]) -> str:
    """What a chat client keeps as the assistant's message (both runners use this)."""
    return tokenizer.decode(output_ids, skip_special_tokens=True).strip()


def run_chatpager(llm, sessions: list[Session], spec: WorkloadSpec,
                  progress: Progress | None = None) -> tuple[RunResult, EngineTrace]:
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=spec.ignore_eos)
    before = eng.stats()
    trace = EngineTrace(num_blocks=before["num_blocks"], block_size=before["block_size"])
    replies: dict[int, list[str]] = {s.index: [] for s in sessions}
    live: dict[str, tuple[Session, TurnRecord]] = {}
    done: list[TurnRecord] = []
    start = time.perf_counter()

    def submit(session: Session, turn: int) -> None:
        ids = llm.encode_chat(session.messages(turn, replies[session.index]))
        rid = eng.add_request(ids, params, request_id=f"bench-s{session.index}-t{turn + 1}")
        live[rid] = session, TurnRecord(session.index, turn + 1, len(ids), time.perf_counter() - start,
                                        prompt_ids=ids)

    for s in sessions:
        submit(s, 0)
    while eng.has_unfinished():
        outputs = eng.step()
        now = time.perf_counter() - start
        for out in outputs:
            session, rec = live[out.request_id]
            if out.new_token_ids and not rec.first_token:
                rec.first_token = now
            if not out.finished:
                continue
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            rec.finished, rec.output_ids, rec.cached_tokens = now, list(out.token_ids), out.num_cached_tokens
            done.append(rec)
            del live[out.request_id]
            replies[session.index].append(reply_text(llm.tokenizer, rec.output_ids))
            if rec.turn < spec.turns:
                submit(session, rec.turn)
            if progress:
                progress(1)
        t0 = time.perf_counter()
        trace.sample(now, eng.stats())
        trace.stats_s += time.perf_counter() - t0
    wall = time.perf_counter() - start
    after = eng.stats()
    trace.counters = {k: after[k] - before[k] for k in COUNTERS}
    done.sort(key=lambda r: (r.session, r.turn))
    return RunResult("chatpager", wall, done, {"max_num_batched_tokens": eng.scheduler.max_num_batched_tokens}), trace
