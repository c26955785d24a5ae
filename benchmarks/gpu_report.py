"""What benchmarks/gpu_check.sh found: the machine, each stage, the tests, the figures; as JSON and text.

    python benchmarks/gpu_report.py env --out ENV.json      # versions and the GPU as torch sees it;
                                                            # exit 1 (one line) if a module is missing
    python benchmarks/gpu_report.py write --work DIR --out DIR --mode gpu|dry --budget S --elapsed S

`write` reads what the stages left in the work folder (each may be missing: a stage that did not
run or was cut short leaves nothing, and the report says so) and writes gpu_check.json and
gpu_check.txt into --out; it prints the text and exits 0 only if every stage ran and passed.

Work folder files: stages.tsv (name, status, seconds, limit, detail: one stage a line),
nvidia_smi.csv and nvidia_smi.txt, env.json, junit.xml and pytest.log, kernel_bench.json,
bench.json (in --out, `chatpager bench`'s own report).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

# What the stages import; a missing one is an install failure.
REQUIRED = ("torch", "triton", "transformers", "safetensors", "tokenizers", "jinja2", "rich", "numpy", "gguf",
            "platformdirs", "pytest", "hypothesis", "chatpager")
VERSIONS = ("torch", "triton", "transformers", "gguf", "pytest")
CUDA_TESTS = "tests/engine/test_cuda.py"
# `pytest -v` lines: "TEST OUTCOME [ 10%]", or under pytest-xdist "[gw0] [ 10%] OUTCOME TEST"
OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
OUTCOME = re.compile(rf"^(?P<test>\S+::\S+) (?P<outcome>{OUTCOMES})\b"
                     rf"|^\[gw\d+\] \[\s*\d+%\] (?P<xoutcome>{OUTCOMES}) (?P<xtest>\S+::\S+)")


# --- env ------------------------------------------------------------------------------------
def probe_env() -> dict:
    import platform

    env: dict = {"python": platform.python_version(), "python_executable": sys.executable, "missing": {}}
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
            env["missing"][name] = f"{type(exc).__name__}: {exc}"
            continue
        if name in VERSIONS:
            env[name] = getattr(module, "__version__", None) or importlib.metadata.version(name)
    if "torch" not in env["missing"]:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["device"] = dict(name=props.name, capability=f"{props.major}.{props.minor}",
                                 memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                                 count=torch.cuda.device_count())
    if "chatpager" not in env["missing"]:
        import chatpager
        from chatpager.errors import ModelLoadError
        from chatpager.engine.model.loader import default_gguf_path

        env["chatpager_from"] = str(Path(chatpager.__file__).parent)
        try:
            env["default_model"] = str(default_gguf_path())
        except ModelLoadError as exc:
            env["default_model_missing"] = str(exc)
    return env


# --- reading the stages' files ----------------------------------------------------------------
def read_stages(work: Path) -> list[dict]:
    path = work / "stages.tsv"
    if not path.is_file():
        return []
    stages = []
    for line in path.read_text().splitlines():
        name, status, seconds, limit, detail = (line.split("\t") + [""] * 5)[:5]
        stages.append(dict(name=name, status=status, seconds=int(seconds or 0), limit_s=int(limit or 0),
                           detail=detail))
    return stages


def read_gpu(work: Path) -> dict:
    gpu: dict = {}
    csv = work / "nvidia_smi.csv"
    if csv.is_file() and csv.read_text().strip():
        fields = [f.strip() for f in csv.read_text().splitlines()[0].split(",")]
        gpu.update(zip(("name", "driver", "memory", "compute_cap"), fields))
    txt = work / "nvidia_smi.txt"
    if txt.is_file():
        m = re.search(r"CUDA Version:\s*([\d.]+)", txt.read_text())
        if m:
            gpu["cuda_driver_api"] = m[1]
    return gpu


def read_tests(work: Path) -> dict | None:
    """Counts and failing names, from the JUnit file, or from `pytest -v`'s lines when pytest
    was stopped before writing it."""
    junit, log = work / "junit.xml", work / "pytest.log"
    if junit.is_file():
        try:
            return _from_junit(ET.parse(junit).getroot())
        except ET.ParseError:
            pass
    if log.is_file():
        return _from_log(log.read_text(errors="replace"))
    return None


def _from_junit(root: ET.Element) -> dict:
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failing, cuda_ran = [], 0
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        if case.get("classname", "").startswith(CUDA_TESTS.removesuffix(".py").replace("/", ".")):
            cuda_ran += 1
        if case.find("failure") is not None:
            counts["failed"] += 1
            failing.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failing.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts, failing=failing, cuda_tests_ran=cuda_ran, source="junit")


def _from_log(text: str) -> dict:
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    key = dict(PASSED="passed", XPASS="passed", FAILED="failed", ERROR="errors", SKIPPED="skipped", XFAIL="skipped")
    failing, cuda_ran = [], 0
    for line in text.splitlines():
        m = OUTCOME.match(line)
        if not m:
            continue
        test, outcome = m["test"] or m["xtest"], m["outcome"] or m["xoutcome"]
        counts[key[outcome]] += 1
        if outcome in ("FAILED", "ERROR"):
            failing.append(test)
        if test.startswith(CUDA_TESTS) and outcome != "SKIPPED":
            cuda_ran += 1
    return dict(counts, failing=failing, cuda_tests_ran=cuda_ran, source="pytest log (cut short)")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def throughput_figures(bench: dict | None) -> dict | None:
    if not bench or "chatpager" not in bench:
        return None
    cp, workload, model = bench["chatpager"], bench.get("workload", {}), bench.get("meta", {}).get("model", {})
    keys = ("sessions", "turns", "output_tokens", "prompt_tokens", "wall_s", "output_tokens_per_s", "ttft_s_mean",
            "ttft_s_by_turn", "latency_s_mean", "latency_s_p90", "prefix_hit_rate_later_turns", "kv_utilization_mean",
            "peak_blocks", "num_blocks", "preemptions", "steps")
    return dict({k: cp.get(k) for k in keys}, command=bench.get("meta", {}).get("command"),
                workload={k: workload.get(k) for k in ("sessions", "turns", "max_tokens", "ignore_eos")},
                model={k: model.get(k) for k in ("name", "device", "dtype", "attention", "quantization")})


# --- the report ---------------------------------------------------------------------------------
def build(work: Path, out: Path, mode: str, budget: int, elapsed: int) -> dict:
    stages = read_stages(work)
    tests = read_tests(work)
    env = read_json(work / "env.json") or {}
    problems = [f"{s['name']}: {s['status']}" + (f" ({s['detail']})" if s["detail"] else "")
                for s in stages if s["status"] != "ok"]
    tests_ran = any(s["name"] == "tests" and s["status"] != "not run" for s in stages)
    if tests:
        problems += [f"test failed: {name}" for name in tests["failing"]]
        if mode == "gpu" and not tests["cuda_tests_ran"] and tests_ran:
            problems.append(f"no test of {CUDA_TESTS} ran on the GPU")
    elif tests_ran:
        problems.append("tests: no result (neither junit.xml nor pytest.log)")
    return {
        "mode": mode,
        "ok": not problems and bool(stages),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "budget_s": budget,
        "elapsed_s": elapsed,
        "commit": _commit(),
        "gpu": read_gpu(work),
        "software": {k: v for k, v in env.items() if k not in ("device", "missing")},
        "torch_device": env.get("device"),
        "stages": stages,
        "tests": tests,
        "kernel_bench": read_json(work / "kernel_bench.json"),
        "throughput": throughput_figures(read_json(out / "bench.json")),
        "problems": problems,
    }


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    changed = len(dirty.stdout.splitlines())
    return head.stdout.strip() + (f" + {changed} changed files" if changed else "")


def render(r: dict) -> str:
    lines = [f"chatpager gpu_check ({r['mode']} run) {r['date']}: {r['elapsed_s']} s of a {r['budget_s']} s budget"]
    gpu, sw, dev = r["gpu"], r["software"], r["torch_device"]
    if gpu:
        lines.append(f"GPU       {gpu.get('name')}, {gpu.get('memory')}, driver {gpu.get('driver')}, "
                     f"CUDA {gpu.get('cuda_driver_api', '?')} (driver), compute {gpu.get('compute_cap', '?')}")
    elif dev:
        lines.append(f"GPU       {dev['name']} (torch), {dev['memory_gib']} GiB")
    else:
        lines.append("GPU       none seen")
    if sw:
        lines.append(f"software  Python {sw.get('python')}, torch {sw.get('torch')} (CUDA {sw.get('torch_cuda')}), "
                     f"triton {sw.get('triton')}, transformers {sw.get('transformers')}, gguf {sw.get('gguf')}")
    if r["commit"]:
        lines.append(f"commit    {r['commit']}")
    lines += ["", "stages"]
    for s in r["stages"]:
        detail = f"  {s['detail']}" if s["detail"] else ""
        limit = f"of {s['limit_s']:>3}" if s["limit_s"] else "      "
        lines.append(f"  {s['name']:<14} {s['status']:<18} {s['seconds']:>4} s {limit}{detail}")
    t = r["tests"]
    if t:
        lines += ["", f"tests     {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                      f"{t['skipped']} skipped; {t['cuda_tests_ran']} of {CUDA_TESTS} ran (from {t['source']})"]
        lines += [f"  FAILED {name}" for name in t["failing"]]
    lines += _render_kernels(r["kernel_bench"])
    lines += _render_throughput(r["throughput"])
    lines += ["", "result    " + ("OK" if r["ok"] else "FAILED")]
    lines += [f"  {p}" for p in r["problems"]]
    return "\n".join(lines) + "\n"


def _render_kernels(k: dict | None) -> list[str]:
    if not k:
        return ["", "kernel bench: no figures"]
    peak = f"{k['peak_gbps']:.0f} GB/s" if k.get("peak_gbps") else "unknown"
    lines = ["", f"kernel bench  {k['device']}, {k['dtype']}, {k['heads']} q / {k['kv_heads']} KV heads, "
                 f"dim {k['head_dim']}; copy {k['copy_gbps']:.0f} GB/s, datasheet peak {peak}",
             f"  {'batch':>5} {'context':>7} {'block':>5} {'splits':>6} {'triton_ms':>9} {'kv_GB/s':>8} "
             f"{'of_copy':>7} {'of_peak':>7} {'sdpa_ms':>8} {'vs_sdpa':>7}"]
    for x in k["results"]:
        of_peak = f"{x['peak_share']:7.1%}" if x.get("peak_share") is not None else f"{'-':>7}"
        sdpa = f"{x['sdpa_ms']:8.3f} {x['vs_sdpa']:7.2f}" if x.get("sdpa_ms") is not None else f"{'-':>8} {'-':>7}"
        lines.append(f"  {x['batch']:5d} {x['context']:7d} {x['block_size']:5d} {x['num_splits']:6d} "
                     f"{x['triton_ms']:9.3f} {x['kv_gbps']:8.1f} {x['bw_share']:7.1%} {of_peak} {sdpa}")
    lines += [f"  skipped: {s}" for s in k.get("skipped", [])]
    return lines


def _render_throughput(t: dict | None) -> list[str]:
    if not t:
        return ["", "throughput: no figures"]
    w, m = t["workload"], t["model"]
    return ["", f"throughput  {t['command']}",
            f"  {m['name']} on {m['device']}, {m['dtype']}, {m['attention']} attention; {w['sessions']} sessions x "
            f"{w['turns']} turns, replies of {w['max_tokens']} tokens{' (EOS ignored)' if w['ignore_eos'] else ''}",
            f"  {t['output_tokens_per_s']:.1f} output tokens/s: {t['output_tokens']} tokens in {t['wall_s']:.1f} s, "
            f"{t['steps']} steps; TTFT mean {t['ttft_s_mean']:.3f} s; latency mean {t['latency_s_mean']:.2f} s, "
            f"p90 {t['latency_s_p90']:.2f} s",
            f"  prefix hit rate (turns >= 2) {t['prefix_hit_rate_later_turns']:.1%}, KV utilization mean "
            f"{t['kv_utilization_mean']:.1%}, peak blocks {t['peak_blocks']} of {t['num_blocks']}, "
            f"preemptions {t['preemptions']}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pe = sub.add_parser("env", help="versions and the GPU; exit 1 if a required module is missing")
    pe.add_argument("--out", type=Path, required=True)
    pw = sub.add_parser("write", help="gpu_check.json and gpu_check.txt from a work folder")
    pw.add_argument("--work", type=Path, required=True)
    pw.add_argument("--out", type=Path, required=True)
    pw.add_argument("--mode", choices=("gpu", "dry"), required=True)
    pw.add_argument("--budget", type=int, required=True)
    pw.add_argument("--elapsed", type=int, required=True)
    args = p.parse_args(argv)
    if args.cmd == "env":
        env = probe_env()
        args.out.write_text(json.dumps(env, indent=1))
        if env["missing"]:
            print("missing: " + "; ".join(f"{k} ({v})" for k, v in env["missing"].items()), file=sys.stderr)
            return 1
        return 0
    report = build(args.work, args.out, args.mode, args.budget, args.elapsed)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    (args.out / "gpu_check.txt").write_text(text)
    print(text, end="")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
