"""Turn the runs into one report: a JSON-able dict, the goals checked, and a rich table.

The report is the single source for the terminal table, `--json` and `--plot`, so the three
always show the same figures.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from dataclasses import asdict

from chatpager.bench.chatpager_runner import EngineTrace
from chatpager.bench.results import RunResult, greedy_agreement
from chatpager.bench.workload import Session, WorkloadSpec

TTFT_TURN = 5  # the goal compares this turn's TTFT with turn 1's (or the last turn if fewer)


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _hit_rate(run: RunResult, later: bool) -> float:
    turns = [t for t in run.turns if (t.turn > 1) == later]
    sent = sum(t.prompt_tokens for t in turns)
    return sum(t.cached_tokens for t in turns) / sent if sent else 0.0


def chatpager_figures(run: RunResult, trace: EngineTrace) -> dict:
    c = trace.counters
    sent = sum(t.prompt_tokens for t in run.turns)
    busy = [u for u, n in zip(trace.kv_utilization, trace.used_blocks) if n > 0]
    return {
        **run.summary(),
        "kv_utilization_mean": statistics.fmean(busy) if busy else 0.0,
        "kv_utilization_min": min(busy) if busy else 0.0,
        "sharing_ratio_mean": statistics.fmean(trace.sharing_ratio) if trace.sharing_ratio else 1.0,
        "sharing_ratio_peak": max(trace.sharing_ratio, default=1.0),
        "prefix_hit_rate": c["prefix_hit_tokens"] / c["prefix_query_tokens"] if c["prefix_query_tokens"] else 0.0,
        "prefix_hit_rate_turn1": _hit_rate(run, later=False),
        "prefix_hit_rate_later_turns": _hit_rate(run, later=True),
        "prefill_computed_tokens": c["prefix_query_tokens"] - c["prefix_hit_tokens"],
        "prefill_computed_over_prompt_sent": (c["prefix_query_tokens"] - c["prefix_hit_tokens"]) / sent if sent else 0.0,
        "evictions": c["evictions"],
        "preemptions": c["preemptions"],
        "cow_copies": c["cow_copies"],
        "peak_blocks": max(trace.used_blocks, default=0),
        "num_blocks": trace.num_blocks,
        "block_size": trace.block_size,
        "peak_running": max(trace.running, default=0),
        "steps": len(trace.t),
        "stats_sampling_s": trace.stats_s,
    }


def _goal(name: str, target: str, measured: float | None, holds: bool | None) -> dict:
    return {"goal": name, "target": target, "measured": measured, "holds": holds}


def check_goals(cp: dict, serial: dict | None, static: dict | None, contiguous: dict,
                llama: dict | None = None) -> list[dict]:
    tps = cp["output_tokens_per_s"]
    ttft = cp["ttft_s_by_turn"]
    late = max(k for k in ttft if k <= TTFT_TURN) if ttft else 1
    ttft_ratio = ttft[late] / ttft[1] if ttft and ttft[1] > 0 else None
    fit = contiguous["fit_ratio_paged_vs_max_model_len"]
    goals = []
    for label, other, need in (("transformers static batch", static, 3.0), ("transformers serial", serial, 15.0),
                               ("llama.cpp sequential", llama, 2.5)):
        if label.startswith("llama") and other is None:
            continue  # not installed: no goal to check
        x = tps / other["output_tokens_per_s"] if other and other["output_tokens_per_s"] else None
        goals.append(_goal(f"tokens/s vs {label}", f">= {need:g}x", x, None if x is None else x >= need))
    return goals + [
        _goal("KV utilization, mean over steps", ">= 0.97", cp["kv_utilization_mean"],
              cp["kv_utilization_mean"] >= 0.97),
        _goal("sessions that fit: paged vs contiguous max_model_len", ">= 4x", fit,
              True if fit is None else fit >= 4),  # None: contiguous fits none at all
        _goal("turn >= 2 prompt tokens hit in the prefix cache", ">= 0.90", cp["prefix_hit_rate_later_turns"],
              cp["prefix_hit_rate_later_turns"] >= 0.90),
        _goal(f"TTFT turn {late} / turn 1", "<= 1.2", ttft_ratio, None if ttft_ratio is None else ttft_ratio <= 1.2),
    ]


def build_report(spec: WorkloadSpec, sessions: list[Session], model_info: dict, command: str,
                 cp_run: RunResult, trace: EngineTrace, contiguous: dict,
                 serial: RunResult | None, static: RunResult | None, load: dict,
                 llama: RunResult | None = None) -> dict:
    cp = chatpager_figures(cp_run, trace)
    others = {"transformers_serial": serial, "transformers_static": static, "llama_cpp_sequential": llama}
    summaries = {k: r.summary() for k, r in others.items() if r is not None}
    workload = {k: (str(v) if k == "prompts_dir" else v) for k, v in asdict(spec).items()}
    workload["prompts"] = [s.prompt_name for s in sessions]
    return {
        "meta": {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
                 "machine": machine_info(), "model": model_info, "load_average": load},
        "workload": workload,
        "chatpager": cp,
        **summaries,
        "speedup": {k: cp["output_tokens_per_s"] / s["output_tokens_per_s"]
                    for k, s in summaries.items() if s["output_tokens_per_s"]},
        "greedy_agreement": {k: greedy_agreement(cp_run, r) for k, r in others.items() if r is not None},
        "contiguous": contiguous,
        "goals": check_goals(cp, summaries.get("transformers_serial"), summaries.get("transformers_static"),
                             contiguous, summaries.get("llama_cpp_sequential")),
        "trace": {"t": trace.t, "kv_utilization": trace.kv_utilization, "used_blocks": trace.used_blocks,
                  "running": trace.running, "sharing_ratio": trace.sharing_ratio},
        "turns": {"chatpager": cp_run.to_json()["turns"],
                  **{k: r.to_json()["turns"] for k, r in others.items() if r is not None}},
    }


# --- terminal ------------------------------------------------------------------------------
def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def print_report(report: dict, console) -> None:
    from rich.table import Table

    runs = [(k, report[k]) for k in ("chatpager", "transformers_serial", "transformers_static", "llama_cpp_sequential")
            if k in report]
    t = Table(title="Throughput and latency (same workload, same model, greedy)")
    t.add_column("")
    for name, _ in runs:
        t.add_column(name.replace("_", " "), justify="right")
    turns = sorted({int(k) for _, r in runs for k in r["ttft_s_by_turn"]})
    rows = [("sessions × turns run", lambda r: f"{r['sessions']} × {r['turns'] // max(r['sessions'], 1)}"),
            ("batch size", lambda r: _fmt(r.get("batch_size"))),
            ("torch threads", lambda r: _fmt(r.get("threads"))),
            ("output tokens", lambda r: _fmt(r["output_tokens"])),
            ("prompt tokens sent", lambda r: _fmt(r["prompt_tokens"])),
            ("wall s", lambda r: _fmt(r["wall_s"], 1)),
            ("output tokens/s", lambda r: _fmt(r["output_tokens_per_s"], 1))]
    rows += [(f"TTFT turn {k} s", lambda r, k=k: _fmt(_by_turn(r, k), 3)) for k in turns]
    rows += [("latency mean / p90 s", lambda r: f"{_fmt(r['latency_s_mean'])} / {_fmt(r['latency_s_p90'])}")]
    for label, f in rows:
        t.add_row(label, *(f(r) for _, r in runs))
    speed = report["speedup"]
    t.add_row("chatpager speed-up", "", *(f"{speed[k]:.1f}×" if k in speed else "—" for k, _ in runs[1:]))
    agree = report["greedy_agreement"]
    t.add_row("greedy replies identical", "",
              *(f"{agree[k]['identical']}/{agree[k]['compared']}" if k in agree else "—" for k, _ in runs[1:]))
    console.print(t)

    cp = report["chatpager"]
    e = Table(title="chatpager KV cache")
    e.add_column("figure")
    e.add_column("value", justify="right")
    for label, value in (
            ("KV utilization, mean (min) over steps", f"{cp['kv_utilization_mean']:.1%} ({cp['kv_utilization_min']:.1%})"),
            ("sharing ratio, mean (peak)", f"{cp['sharing_ratio_mean']:.2f} ({cp['sharing_ratio_peak']:.2f})"),
            ("prefix hit rate: all / turn 1 / turns ≥ 2",
             f"{cp['prefix_hit_rate']:.1%} / {cp['prefix_hit_rate_turn1']:.1%} / {cp['prefix_hit_rate_later_turns']:.1%}"),
            ("prefill tokens computed ÷ prompt tokens sent", f"{cp['prefill_computed_over_prompt_sent']:.1%}"),
            ("peak blocks in use / pool", f"{cp['peak_blocks']} / {cp['num_blocks']} (block size {cp['block_size']})"),
            ("peak running sequences", str(cp["peak_running"])),
            ("evictions / preemptions / CoW copies", f"{cp['evictions']} / {cp['preemptions']} / {cp['cow_copies']}"),
            ("steps", str(cp["steps"]))):
        e.add_row(label, value)
    console.print(e)

    c = report["contiguous"]
    m = Table(title=f"KV memory: contiguous vs paged (pool {c['pool_slots']:,} slots, "
                    f"{c['sessions']} sessions, peak {c['peak_session_tokens_mean']:.0f} tokens/session)")
    for col in ("scheme", "slots per session", "sessions that fit", "all sessions at peak, MiB"):
        m.add_column(col, justify="right" if col != "scheme" else "left")
    labels = {"contiguous_max_model_len": f"contiguous, max_model_len = {c['max_model_len']}",
              "contiguous_prompt_plus_max_tokens": "contiguous, prompt + max_tokens",
              "paged_no_sharing": "paged, no sharing", "paged": "paged + prefix sharing (chatpager)"}
    for k, label in labels.items():
        m.add_row(label, f"{c['slots_per_session'][k]:,.0f}", str(c["sessions_that_fit"][k]),
                  f"{c['bytes_all_sessions_at_peak'][k] / 2**20:,.1f}")
    console.print(m)

    g = Table(title="Goals")
    for col in ("goal", "target", "measured", "holds"):
        g.add_column(col)
    for goal in report["goals"]:
        holds = {True: "[green]yes[/]", False: "[red]no[/]", None: "—"}[goal["holds"]]
        g.add_row(goal["goal"], goal["target"], _fmt(goal["measured"], 3), holds)
    console.print(g)
    meta = report["meta"]
    console.print(f"{meta['date']} · {meta['machine']['cpu']} · {meta['machine']['cores']} cores · "
                  f"torch {meta['machine']['torch']} (OMP_WAIT_POLICY={meta['machine']['omp_wait_policy']}) · "
                  f"load average {meta['load_average']['before']:.2f} → {meta['load_average']['after']:.2f}")


def _by_turn(run: dict, k: int):
    ttft = run["ttft_s_by_turn"]
    return ttft.get(k, ttft.get(str(k)))
