"""All layer matmuls of one SmolLM2-135M token, int4: torch's op against chatpager's VNNI kernel.

30 layers x (qkv, o, gate_up, down) = 120 matmuls with distinct random Q4_1-like weights, so
each pass streams them from memory as a decode step does (docs/ARCHITECTURE.md, "Measured
facts": reusing one matrix measures cache). Per row count, the time of one pass (median of
--reps), wall and process CPU:

    .venv/bin/python benchmarks/int4_matmul.py --rows 1 16 64 --threads 2
    aten_bf16   torch.ops.aten._weight_int4pack_mm_for_cpu, bf16 activations (its fast path),
                the casts to and from bf16 included, as quantization.Int4Linear runs it
    vnni        chatpager.kernels.cpu_int4, float32 in and out
    fp32        F.linear on the dequantized float32 weights (--fp32)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from chatpager.omp_policy import choose_wait_policy  # noqa: E402

choose_wait_policy()  # the OpenMP wait policy chat and serve get; before torch loads
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from chatpager.engine.model.gguf_weights import GroupedInt4  # noqa: E402
from chatpager.engine.model.quantization import int4_linear  # noqa: E402
from chatpager.kernels import cpu_int4  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 576, 1536, 30
SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # (N, K)


def random_int4(n: int, k: int) -> GroupedInt4:
    scale = torch.rand(n, k // 32) * 0.02 + 0.001
    return GroupedInt4(torch.randint(0, 16, (n, k), dtype=torch.uint8), scale, -8 * scale)


def timed(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up: builds, first-touch pages
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--fp32", action="store_true", help="also time F.linear on float32 weights")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [random_int4(n, k) for _ in range(LAYERS) for n, k in SHAPES]
    aten = [int4_linear(w, kernel="aten") for w in weights]
    vnni = [int4_linear(w, kernel="vnni") for w in weights] if cpu_int4.available() else None
    dense = [w.dequantize() for w in weights] if args.fp32 else None
    print(f"{len(weights)} matmuls, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}")
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (HIDDEN, INTERMEDIATE)}
        runs = {"aten_bf16": lambda: [lin(xs[w.codes.shape[1]]) for lin, w in zip(aten, weights)]}
        if vnni is not None:
            runs["vnni"] = lambda: [lin(xs[w.codes.shape[1]]) for lin, w in zip(vnni, weights)]
        if dense is not None:
            runs["fp32"] = lambda: [F.linear(xs[w.shape[1]], w) for w in dense]
        for name, fn in runs.items():
            wall, cpu = timed(fn, args.reps)
            print(f"rows {m:3d}  {name:10s} {wall * 1e3:7.2f} ms wall  {cpu * 1e3:7.2f} ms CPU")


if __name__ == "__main__":
    main()
