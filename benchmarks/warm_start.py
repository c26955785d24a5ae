"""Start to first token on a warm cache: a fresh process runs `LLM()` (the default model, its
cached conversion) and a 1-token chat; wall time from process start to the first token.

Each run is a new Python process (`sys.executable -c ...`), timed from just before it is spawned
until it prints; the child also reports when `LLM()` returned, measured against its own start
(`process start` = the spawn time the parent passes in, so interpreter start-up is counted).
Runs repeat `--runs` times after one untimed warm-up run (fills the OS file cache and, on a
first use, the model conversion). A last run under `python -X importtime` names the modules
that cost most to import (cumulative, top `--top`).

    .venv/bin/python benchmarks/warm_start.py                  # 2 timed runs, breakdown, figure
    .venv/bin/python benchmarks/warm_start.py --runs 5 --json out/warm_start.json

The figure is the median of the runs' time to first token. Load average is printed beside it:
the machine is shared, and start-up is CPU-bound, so each run also gives the child's CPU time
(`time.process_time`, all its threads, interpreter start excluded) at the same three points: on a
busy machine that is the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GOAL_S = 3.0
CHILD = """
import sys, time
t0 = float(sys.argv[1])
from chatpager import LLM, SamplingParams
t_import, c_import = time.time(), time.process_time()
stages = []
llm = LLM(progress=lambda stage, _: stages.append((stage, time.time() - t0)))
t_ready, c_ready = time.time(), time.process_time()
out = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0.0, max_tokens=1))
t_first, c_first = time.time(), time.process_time()
assert len(out[0].token_ids) == 1
for stage, t in stages:
    print("STAGE", round(t, 3), stage)
print("TIMES", t_import - t0, t_ready - t0, t_first - t0, c_import, c_ready, c_first, flush=True)
"""


def one_run(extra: list[str] | None = None) -> tuple[dict[str, float], str]:
    """One fresh process; returns its times (seconds since spawn) and its stderr."""
    start = time.time()
    proc = subprocess.run([sys.executable, *(extra or []), "-c", CHILD, repr(start)],
                          capture_output=True, text=True, env=os.environ.copy())
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"the child failed (status {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("TIMES"))
    imported, ready, first, cpu_imported, cpu_ready, cpu_first = (float(x) for x in line.split()[1:])
    stages = [line.split(maxsplit=2)[1:] for line in proc.stdout.splitlines() if line.startswith("STAGE")]
    return {"imports": imported, "llm_ready": ready, "first_token": first, "process_exit": wall,
            "cpu_imports": cpu_imported, "cpu_llm_ready": cpu_ready, "cpu_first_token": cpu_first,
            "stages": [(name, float(t)) for t, name in stages]}, proc.stderr


def import_offenders(stderr: str, top: int) -> list[tuple[float, int, str]]:
    """The `top` slowest imports by cumulative time, as (seconds, depth, module) in import
    order, so that the list reads as a tree: a module's time includes the modules under it."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((int(cumulative) / 1e6, depth, name.strip()))
    # importtime prints a module after its children: reverse for parents first
    rows.reverse()
    slowest = set(sorted(range(len(rows)), key=lambda i: -rows[i][0])[:top])
    return [rows[i] for i in range(len(rows)) if i in slowest]


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="timed runs (default 2)")
    parser.add_argument("--top", type=int, default=15, help="import offenders to list (default 15)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    print(f"load average before: {uptime()}")
    one_run()  # warm-up: OS file cache, conversion on a first use
    runs = []
    for i in range(args.runs):
        times, _ = one_run()
        runs.append(times)
        print(f"run {i + 1}: imports {times['imports']:.2f} s, LLM ready {times['llm_ready']:.2f} s, "
              f"first token {times['first_token']:.2f} s; CPU time {times['cpu_imports']:.2f} / "
              f"{times['cpu_llm_ready']:.2f} / {times['cpu_first_token']:.2f} s (load {uptime()})")
        print("       LLM() stages, seconds since spawn: " + ", ".join(f"{name} {t:.2f}" for name, t in times["stages"]))
    _, stderr = one_run(["-X", "importtime"])
    offenders = import_offenders(stderr, args.top)
    print("\nslowest imports (cumulative, one -X importtime run, which itself slows imports):")
    for seconds, depth, name in offenders:
        print(f"  {seconds:6.3f} s  {'  ' * depth}{name}")
    figure = statistics.median(r["first_token"] for r in runs)
    each = ", ".join(f"{r['first_token']:.2f}" for r in runs)
    print(f"\nstart to first token, warm cache: {figure:.2f} s median of {args.runs} ({each}); goal <= {GOAL_S} s "
          f"{'met' if figure <= GOAL_S else 'NOT met'}; load average after: {uptime()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "median_first_token_s": figure, "import_offenders": offenders,
                       "load_average": uptime()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
