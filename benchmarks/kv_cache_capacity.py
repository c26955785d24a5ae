"""Chat sessions that fit one fixed KV memory budget, per KV cache dtype (fp32 vs bf16/int8/fp8).

Every dtype gets the same `--kv-cache-memory`; the pool is sized from it (scales included for
int8/fp8). S sessions, each a distinct prompt of `--prompt` tokens that then generates
`--gen` tokens with EOS ignored, are submitted at once; we record the most sessions holding
blocks at the same time (the pool's capacity in sessions of that length), whether anyone had
to be preempted, and the wall time of the whole run.

    .venv/bin/python benchmarks/kv_cache_capacity.py                       # default model, 16 MiB
    .venv/bin/python benchmarks/kv_cache_capacity.py --kv-cache-memory 32 --prompt 200 --gen 32
"""
from __future__ import annotations

import argparse
import time

from chatpager.omp_policy import choose_wait_policy  # noqa: E402

choose_wait_policy()  # the OpenMP wait policy chat and serve get; before torch loads

import torch  # noqa: E402

from chatpager import LLM, SamplingParams  # noqa: E402


def run(dtype: str, args: argparse.Namespace) -> dict:
    llm = LLM(args.model, kv_cache_dtype=dtype, kv_cache_memory=int(args.kv_cache_memory * 2**20),
              quantization="none", dtype="float32", max_num_batched_tokens=args.budget)
    engine = llm.engine
    gen = torch.Generator().manual_seed(0)
    vocab = llm.model.config.vocab_size
    for _ in range(args.sessions):  # distinct prompts: no prefix sharing inflates the count
        engine.add_request(torch.randint(100, vocab, (args.prompt,), generator=gen).tolist(),
                           SamplingParams(max_tokens=args.gen, ignore_eos=True, temperature=0.0))
    peak, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, sum(1 for s in engine.seqs.values() if s.blocks))
    stats = llm.stats()
    return {"kv_cache_dtype": dtype, "num_blocks": stats["num_blocks"],
            "bytes_per_block": llm.model_info["kv_bytes_per_block"], "peak_sessions": peak,
            "preemptions": stats["preemptions"], "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--kv-cache-memory", type=float, default=16, metavar="MIB")
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens per session")
    p.add_argument("--gen", type=int, default=32, help="generated tokens per session")
    p.add_argument("--sessions", type=int, default=16, help="sessions submitted (more than fit)")
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8", "fp8"])
    args = p.parse_args()
    rows = [run(d, args) for d in args.dtypes]
    base = rows[0]["peak_sessions"]
    print(f"{args.kv_cache_memory:g} MiB KV, sessions of {args.prompt}+{args.gen} tokens, {args.sessions} submitted")
    print(f"{'kv dtype':>9} {'blocks':>7} {'B/block':>8} {'sessions':>9} {'vs first':>9} {'preempt':>8} {'s':>7}")
    for r in rows:
        print(f"{r['kv_cache_dtype']:>9} {r['num_blocks']:>7} {r['bytes_per_block']:>8} {r['peak_sessions']:>9} "
              f"{r['peak_sessions'] / base:>8.2f}x {r['preemptions']:>8} {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
