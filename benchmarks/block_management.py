"""Share of engine step time spent on block management, at N running sequences.

Block management = the Scheduler (`schedule`: who runs, slot allocation, prefix matching,
admission, preemption) and the BlockManager/BlockPool calls the engine makes around the model
(`end_step` after each forward, `free` when a request ends). Each is timed by wrapping
the bound method on this engine's instances; the model forward, sampling and detokenization
make up the rest of `LLMEngine.step`. The host-side batch preparation of the ModelRunner
(packing tokens, slots and block tables into tensors, the attention plan) is reported
separately: it is per-step Python work too, but not block management.

N sequences (default 64) start from the chat workload's first-turn prompts (shared system
prompts, so prefix hits and shared blocks are exercised) and decode with EOS ignored; the
measured window starts once all N are decoding.

    .venv/bin/python benchmarks/block_management.py [--seqs 64] [--steps 20] [--threads N]

It first prints the cost per token of the block keys (`BlockManager.match_prefix` on an empty
pool: every full block of a long prompt is hashed once and looked up once).

Cross-check with a sampling profiler (no wrappers):
    .venv/bin/py-spy record -r 100 -o profile.svg -- .venv/bin/python benchmarks/block_management.py
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

from chatpager.omp_policy import choose_wait_policy  # noqa: E402

choose_wait_policy()  # the OpenMP wait policy chat and serve get; before torch loads
import torch  # noqa: E402

from chatpager import LLM, SamplingParams  # noqa: E402
from chatpager.bench.workload import build_workload, WorkloadSpec  # noqa: E402
from chatpager.engine.core.block_manager import BlockManager  # noqa: E402
from chatpager.engine.core.block_pool import BlockPool  # noqa: E402
from chatpager.engine.core.request import Sequence  # noqa: E402

BLOCK_MANAGER_CALLS = ("end_step", "free", "allocate_slots", "match_prefix", "admit")
IN_SCHEDULE = ("allocate_slots", "match_prefix", "admit")  # called from Scheduler.schedule


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner, name: str, label: str) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return method(*args, **kwargs)
            t = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - t

        setattr(owner, name, timed)


def key_cost_ns_per_token(num_tokens: int = 1 << 16, block_size: int = 16, repeats: int = 5) -> float:
    """Best of `repeats`: hashing and looking up every full block of one long prompt."""
    tokens = [(i * 7919) % 49152 for i in range(num_tokens)]
    best = float("inf")
    for _ in range(repeats):
        bm = BlockManager(BlockPool(8), block_size)
        seq = Sequence("key-cost", tokens, SamplingParams(), max_len=num_tokens + 1)
        t = time.perf_counter()
        bm.match_prefix(seq)
        best = min(best, time.perf_counter() - t)
    return best / num_tokens * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--max-tokens", type=int, default=200)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"block keys: {key_cost_ns_per_token():.1f} ns per prompt token (hash + lookup, block size 16)")
    llm = LLM(max_model_len=2048, kv_cache_memory=2**30)
    eng = llm.engine
    timers = Timers()
    timers.wrap(eng.scheduler, "schedule", "scheduler.schedule")
    for name in BLOCK_MANAGER_CALLS:
        timers.wrap(eng.block_manager, name, f"block_manager.{name}")
    timers.wrap(eng.runner, "run", "runner.run")
    timers.wrap(eng.runner.model, "forward", "model.forward")
    timers.wrap(eng.runner.model, "logits", "model.logits")

    sessions = build_workload(WorkloadSpec(sessions=args.seqs, turns=1))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for s in sessions:
        eng.add_request(llm.encode_chat(s.messages(0, [])), params)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in eng.seqs.values()):
        eng.step()
    running = eng.stats()["running"]
    timers.on = True
    start = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    wall = time.perf_counter() - start
    timers.on = False

    per_step = {k: v / args.steps * 1e3 for k, v in timers.total.items()}
    step_ms = wall / args.steps * 1e3
    inside_schedule = sum(per_step.get(f"block_manager.{n}", 0) for n in IN_SCHEDULE)
    block_mgmt = per_step.get("scheduler.schedule", 0) + per_step.get("block_manager.end_step", 0) \
        + per_step.get("block_manager.free", 0)
    host_prep = per_step["runner.run"] - per_step["model.forward"] - per_step["model.logits"]
    stats = eng.stats()
    print(f"{running} running sequences, {args.steps} decode steps, {torch.get_num_threads()} torch thread(s), "
          f"context {min(s.num_tokens for s in eng.seqs.values())}-{max(s.num_tokens for s in eng.seqs.values())} "
          f"tokens, sharing ratio {stats['sharing_ratio']:.2f}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'':44s}{'ms/step':>10s}{'% of step':>11s}")
    rows = [("engine step (wall)", step_ms),
            ("block management (scheduler + block manager)", block_mgmt),
            ("  Scheduler.schedule", per_step.get("scheduler.schedule", 0)),
            ("    of which BlockManager calls", inside_schedule),
            ("  BlockManager.end_step", per_step.get("block_manager.end_step", 0)),
            ("  BlockManager.free", per_step.get("block_manager.free", 0)),
            ("ModelRunner host-side prep (tensors, plan)", host_prep),
            ("Model.forward", per_step["model.forward"]),
            ("Model.logits", per_step["model.logits"]),
            ("rest of step (sampling, detokenize, outputs)", step_ms - per_step["runner.run"] - block_mgmt)]
    for label, ms in rows:
        print(f"{label:44s}{ms:10.2f}{100 * ms / step_ms:10.2f}%")


if __name__ == "__main__":
    main()
