"""Decode-step paged attention on a GPU: the Triton kernel against SDPA on contiguous K/V.

Llama-3-8B-like attention (32 query heads, 8 KV heads, head_dim 128) in bf16, one new token
per sequence, for each batch x context x block size that fits in GPU memory. Per config:

  triton_ms  kernel time: median of repeats, L2 flushed before each (GPU events)
  kv_GB/s    K/V bytes the step must read / triton_ms
  bw_share   kv_GB/s / the device bandwidth measured in this run by a large device-to-device
             copy (bytes read + bytes written) / copy time
  peak_share kv_GB/s / the GPU's datasheet memory bandwidth (PEAK_GBPS, or --peak-gbps)
  sdpa_ms    torch scaled_dot_product_attention on the same K/V laid out contiguously
             [batch, kv_heads, context, dim]; the 4 query heads of each KV head go in as 4
             query rows without a mask, which for a single decode token is exactly GQA
  vs_sdpa    sdpa_ms / triton_ms (> 1: the paged kernel is faster)
  max_err    max |triton - sdpa| over the outputs (a correctness check on the way)

FlexAttention's paged attention is not measured (its paged API is experimental). With --json
the file is rewritten after every config, so a run cut short still leaves what it measured.

    python benchmarks/kernel_bench.py [--json PATH] [--batches 1 8] [--contexts 4096] ...
    python benchmarks/kernel_bench.py --device cpu --interpret --tiny   # smoke run, no GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from chatpager.kernels.triton_env import import_triton, interpreting

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TINY_HEADS, TINY_KV_HEADS, TINY_HEAD_DIM = 8, 2, 64
COPY_BYTES = {"cuda": 2 * 2**30, "cpu": 64 * 2**20}
L2_FLUSH_BYTES = 512 * 2**20  # well above any L2, and ~0.2 ms of writes to hide launch overhead
MEMORY_HEADROOM = 0.9  # use at most this share of free GPU memory for one config's tensors
# Datasheet memory bandwidth in GB/s by a piece of torch's device name, most specific first.
PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
             ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
             ("L40S", 864.0), ("L4", 300.0))


@dataclass(frozen=True)
class Setup:
    """What every config of one run shares."""

    device: torch.device
    heads: tuple[int, int, int]  # query heads, KV heads, head_dim
    num_splits: int | None  # None: the kernel's heuristic
    reps: int
    copy_gbps: float  # the device bandwidth every bw_share is relative to
    peak_gbps: float | None  # the datasheet bandwidth every peak_share is relative to; None: unknown
    flush: torch.Tensor | None  # written before each timed call to evict K/V from L2


@dataclass
class Result:
    batch: int
    context: int
    block_size: int
    num_splits: int
    triton_ms: float
    kv_gbps: float
    bw_share: float
    peak_share: float | None
    sdpa_ms: float | None
    vs_sdpa: float | None
    max_abs_err: float | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--interpret", action="store_true", help="run Triton under its interpreter (needed on CPU)")
    p.add_argument("--tiny", action="store_true", help="a tiny config for a smoke run (small heads, short context)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--num-splits", type=int, default=None, help="force the split-KV count (default: heuristic)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="the GPU's datasheet memory bandwidth in GB/s (default: looked up by name in PEAK_GBPS)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.tiny:
        args.batches, args.contexts, args.block_sizes, args.reps = [1, 3], [48], [16], 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel_bench: no CUDA device here; this benchmark times GPU kernels.\n"
              "For a smoke run of the code path on CPU: --device cpu --interpret --tiny", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.interpret:
        print("kernel_bench: --device cpu needs --interpret (Triton runs on CPU only under its interpreter)",
              file=sys.stderr)
        return 2
    if args.interpret and compiled_kernels_loaded():
        return rerun_interpreted(sys.argv[1:] if argv is None else argv)
    import_triton(interpret=args.interpret or None)  # before the kernels are imported
    device = torch.device(args.device)
    setup = Setup(
        device=device,
        heads=(TINY_HEADS, TINY_KV_HEADS, TINY_HEAD_DIM) if args.tiny else (HEADS, KV_HEADS, HEAD_DIM),
        num_splits=args.num_splits,
        reps=args.reps,
        copy_gbps=copy_bandwidth_gbps(device),
        peak_gbps=args.peak_gbps or datasheet_gbps(device_name(device)),
        flush=torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None,
    )
    results, skipped = [], []
    for block_size in args.block_sizes:
        for context in args.contexts:
            for batch in args.batches:
                result = bench_config(setup, batch, context, block_size)
                (results if isinstance(result, Result) else skipped).append(result)
                if args.json:
                    write_json(args.json, setup, results, skipped)

    print_table(results, skipped, device, setup)
    return 0


def compiled_kernels_loaded() -> bool:
    """True when this process imported chatpager's Triton kernels compiled for a GPU. Triton picks
    interpreter or compiler once per kernel, when its module is imported, so those kernels cannot
    run on CPU tensors (and re-decorating Triton's library for the interpreter would break any
    kernel compiled later in the process): an interpreted run needs a process of its own."""
    return "chatpager.kernels.paged_attention_triton" in sys.modules and not interpreting()


def rerun_interpreted(argv: list[str]) -> int:
    """This script with the same arguments in a child process with the interpreter on; its output
    printed here."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True)
    print(child.stdout, end="")
    print(child.stderr, end="", file=sys.stderr)
    return child.returncode


def datasheet_gbps(name: str) -> float | None:
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def write_json(path: str, setup: Setup, results: list[Result], skipped: list[str]) -> None:
    num_heads, num_kv_heads, head_dim = setup.heads
    report = dict(device=device_name(setup.device), dtype="bfloat16", heads=num_heads, kv_heads=num_kv_heads,
                  head_dim=head_dim, copy_gbps=setup.copy_gbps, peak_gbps=setup.peak_gbps,
                  results=[asdict(r) for r in results], skipped=skipped)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def bench_config(setup: Setup, batch: int, context: int, block_size: int) -> Result | str:
    """Time one config; returns a skip reason instead when its tensors do not fit."""
    from chatpager.kernels.paged_attention_triton import paged_attention_triton, plan_launch

    device, reps, flush, num_splits = setup.device, setup.reps, setup.flush, setup.num_splits
    num_heads, num_kv_heads, head_dim = setup.heads
    if context % block_size:
        return f"batch {batch} context {context} block {block_size}: context not a multiple of block size"
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * torch.bfloat16.itemsize  # K and V
    if not fits(device, kv_bytes):
        return f"batch {batch} context {context} block {block_size}: {kv_bytes / 2**30:.1f} GiB K/V does not fit"
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
    v_cache = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
    # Shuffled physical blocks, as a cache looks after some churn.
    block_tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
    q = torch.empty(batch, num_heads, head_dim, dtype=torch.bfloat16, device=device).normal_()
    out = torch.empty_like(q)
    scale = head_dim ** -0.5

    def run_triton() -> None:
        paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
                               num_splits=num_splits)

    triton_ms = time_ms(run_triton, reps, device, flush)
    kv_gbps = kv_bytes / triton_ms / 1e6
    splits = plan_launch(q, k_cache, block_tables, num_splits).num_splits
    sdpa_ms = vs_sdpa = err = None
    if fits(device, kv_bytes):  # the contiguous copy for SDPA is a second set of K/V
        k, v = contiguous_kv(k_cache, block_tables), contiguous_kv(v_cache, block_tables)
        q_rows = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # head h -> kv head h // group

        def run_sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q_rows, k, v, scale=scale)

        sdpa_ms = time_ms(run_sdpa, reps, device, flush)
        vs_sdpa = sdpa_ms / triton_ms
        run_triton()
        err = (out.float() - run_sdpa().view_as(out).float()).abs().max().item()
        del k, v
    del k_cache, v_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak_share = kv_gbps / setup.peak_gbps if setup.peak_gbps else None
    return Result(batch, context, block_size, splits, triton_ms, kv_gbps, kv_gbps / setup.copy_gbps, peak_share,
                  sdpa_ms, vs_sdpa, err)


def contiguous_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[batch, kv_heads, context, dim] copy of each sequence's blocks, one sequence at a time
    so the gather never holds more than one extra sequence."""
    batch, blocks_per_seq = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    dense = torch.empty(batch, num_kv_heads, blocks_per_seq * block_size, head_dim, dtype=cache.dtype,
                        device=cache.device)
    for b in range(batch):
        dense[b] = cache[block_tables[b].long()].reshape(-1, num_kv_heads, head_dim).transpose(0, 1)
    return dense


def fits(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cached blocks
    return nbytes < MEMORY_HEADROOM * free


def time_ms(fn: Callable[[], object], reps: int, device: torch.device, flush: torch.Tensor | None) -> float:
    """Median time of fn in ms. On CUDA: GPU events around each call, with the L2 flushed
    just before; the flush also keeps the GPU busy while the next launch is queued, so the
    events time the kernels rather than Python launch overhead."""
    fn()  # compile / warm up
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    events = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device memory bandwidth in GB/s from a large copy: (bytes read + bytes written) / time."""
    nbytes = COPY_BYTES[device.type]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 10, device, flush=None)
    return 2 * nbytes / ms / 1e6


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"


def print_table(results: list[Result], skipped: list[str], device: torch.device, setup: Setup) -> None:
    peak = f"{setup.peak_gbps:.0f} GB/s" if setup.peak_gbps else "unknown (--peak-gbps)"
    print(f"{device_name(device)}: copy bandwidth {setup.copy_gbps:.0f} GB/s, datasheet peak {peak}")
    header = (f"{'batch':>5} {'context':>7} {'block':>5} {'splits':>6} {'triton_ms':>10} {'kv_GB/s':>8} "
              f"{'bw_share':>8} {'peak':>6} {'sdpa_ms':>8} {'vs_sdpa':>7} {'max_err':>8}")
    print(header)
    for r in results:
        sdpa = (f"{r.sdpa_ms:8.3f} {r.vs_sdpa:7.2f} {r.max_abs_err:8.1e}" if r.sdpa_ms is not None
                else f"{'-':>8} {'-':>7} {'-':>8}")
        peak = f"{r.peak_share:6.1%}" if r.peak_share is not None else f"{'-':>6}"
        print(f"{r.batch:5d} {r.context:7d} {r.block_size:5d} {r.num_splits:6d} {r.triton_ms:10.3f} "
              f"{r.kv_gbps:8.1f} {r.bw_share:8.1%} {peak} {sdpa}")
    for reason in skipped:
        print(f"skipped: {reason}")


if __name__ == "__main__":
    sys.exit(main())
