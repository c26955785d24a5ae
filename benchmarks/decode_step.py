"""Time of one engine decode step: N sequences of C context tokens, a fraction of it shared.

Each sequence's prompt is a common prefix (`--shared` of the context, e.g. a system prompt)
followed by its own random tokens; all N are prefilled first, then `--steps` decode steps are
timed (wall and process CPU time). Run it against older commits to measure an engine change:

    .venv/bin/python benchmarks/decode_step.py --seqs 32 --context 600 --shared 0.75
    .venv/bin/python benchmarks/decode_step.py --seqs 1 --context 200 --profile   # where a step's time goes
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old .venv/bin/python benchmarks/decode_step.py ...
"""
from __future__ import annotations

import argparse
import os
import random
import time

from chatpager.omp_policy import choose_wait_policy  # noqa: E402

choose_wait_policy()  # the OpenMP wait policy chat and serve get; before torch loads
import torch  # noqa: E402

from chatpager import LLM, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--shared", type=float, default=0.75, help="fraction of the context all sequences share")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice, one per core, as chatpager bench)")
    p.add_argument("--quantization", default="auto", help="LLM(quantization=...) (%(default)s)")
    p.add_argument("--dtype", default="auto", help="LLM(dtype=...) (%(default)s)")
    p.add_argument("--profile", action="store_true", help="also print the torch profiler's table for the timed steps")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(max_model_len=2048, kv_cache_memory=2**30, quantization=args.quantization, dtype=args.dtype)
    eng = llm.engine
    rng = random.Random(0)
    common = [rng.randrange(100, 40000) for _ in range(int(args.context * args.shared))]
    # long enough that no sequence ends before the last one is prefilled and the window is over
    params = SamplingParams(temperature=0.0, max_tokens=2048 - args.context - 1, ignore_eos=True)
    for _ in range(args.seqs):
        own = [rng.randrange(100, 40000) for _ in range(args.context - len(common))]
        eng.add_request(common + own, params)
    start = time.perf_counter()
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.seqs.values()):
        eng.step()
    prefill = time.perf_counter() - start
    eng.step()  # the first decode step of each sequence
    running = eng.stats()["running"]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        eng.step()
    wall, cpu = (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                eng.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"{llm.model_info['quantization']}: {running} running seqs x {args.context} tokens ({args.shared:.0%} shared), {torch.get_num_threads()} "
          f"thread(s): prefill {prefill:.1f} s; decode step {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU "
          f"-> {args.seqs / wall:.1f} tok/s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
