"""`chatpager bench`: the chat workload on chatpager and on transformers, one run, one report.

    chatpager bench                                  # default workload, about a minute of chatpager
    chatpager bench --sessions 64 --turns 8          # scale up
    chatpager bench --json out.json --plot out.png   # for machines and for people
    chatpager bench --quick --model DIR              # a seconds-long smoke run
    chatpager bench --server http://127.0.0.1:8000/v1  # the same workload against chatpager serve
    chatpager bench --single                         # one chat, 128 tokens: chatpager, transformers, llama.cpp

llama.cpp (the optional `llamacpp` extra) runs as a peer on the same GGUF when it is installed:
the sessions served one after another, as a local llama.cpp user gets them.
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

from chatpager.bench.workload import WorkloadSpec

DEFAULT_KV_CACHE_MIB = 1024  # fp32 K/V of SmolLM2-135M: 45 KiB a token, so ~23k slots
# A context a chat server would configure for this workload (its longest session is ~900 tokens).
# SmolLM2's own 8192 would make contiguous allocation look 4x worse still.
DEFAULT_MAX_MODEL_LEN = 2048
QUICK = dict(sessions=4, turns=2, max_tokens=8, hf_serial_sessions=1, hf_batch=2, hf_static_sessions=2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chatpager bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = WorkloadSpec()
    w = p.add_argument_group("workload")
    w.add_argument("--sessions", type=int, default=d.sessions, help="concurrent chat sessions S (%(default)s)")
    w.add_argument("--turns", type=int, default=d.turns, help="turns per session T (%(default)s)")
    w.add_argument("--max-tokens", type=int, default=d.max_tokens, help="reply cap R (%(default)s)")
    w.add_argument("--ignore-eos", action="store_true", help="every reply is exactly --max-tokens long")
    w.add_argument("--seed", type=int, default=d.seed)
    w.add_argument("--prompts", type=Path, default=d.prompts_dir, help="folder of system prompts (*.md)")
    w.add_argument("--quick", action="store_true", help="a tiny workload for smoke tests")
    w.add_argument("--single", action="store_true",
                   help="instead: one chat, one reply of --single-tokens greedy tokens on every runner")
    w.add_argument("--single-tokens", type=int, default=128, help="reply length for --single (%(default)s)")
    e = p.add_argument_group("chatpager")
    e.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help=f"context per sequence, also what contiguous allocation reserves "
                        f"(default {DEFAULT_MAX_MODEL_LEN}, or the model's limit if smaller)")
    e.add_argument("--kv-cache-mib", type=int, default=DEFAULT_KV_CACHE_MIB,
                   help="KV pool size in MiB (%(default)s: the default workload's sessions all fit)")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--quantization", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="chatpager's weights (default auto: the GGUF's own int4 on CPU)")
    e.add_argument("--threads", type=int, default=0,
                   help="torch threads, for every runner (default: torch's choice, one per core)")
    t = p.add_argument_group("transformers baselines")
    t.add_argument("--hf-serial-sessions", type=int, default=1,
                   help="sessions run one at a time on generate (%(default)s; 0 skips)")
    t.add_argument("--hf-batch", type=int, default=16, help="static batch size (%(default)s)")
    t.add_argument("--hf-static-sessions", type=int, default=None,
                   help="sessions run in static batches (default: one batch; 0 skips)")
    t.add_argument("--no-transformers", action="store_true", help="skip both transformers baselines")
    t.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp even when it is installed")
    h = p.add_argument_group("over HTTP (instead of in process)")
    h.add_argument("--server", metavar="URL", default=None,
                   help="drive a running `chatpager serve` (e.g. http://127.0.0.1:8000/v1) with the workload")
    h.add_argument("--api-key", default=None, help="its API key, if it needs one")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, help="write the full report here")
    o.add_argument("--plot", type=Path, default=None, help="write a PNG: utilization, blocks, throughput")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.hf_static_sessions is None:
        args.hf_static_sessions = args.hf_batch
    if args.no_transformers:
        args.hf_serial_sessions = args.hf_static_sessions = 0
    return args


@contextmanager
def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        yield bar


def main(argv: list[str]) -> int:
    # The OpenMP wait policy is what chat and serve get (`chatpager.omp_policy`, chosen by
    # chatpager.cli before torch loads); the report records it.
    args = parse_args(argv)
    args.command = " ".join(["chatpager bench", *argv])
    from rich.console import Console

    console = Console(stderr=False)
    spec = WorkloadSpec(sessions=args.sessions, turns=args.turns, max_tokens=args.max_tokens,
                        ignore_eos=args.ignore_eos, seed=args.seed, prompts_dir=args.prompts)
    if args.server:
        return _bench_server(args, spec, console)
    if args.single:
        return _bench_single(args, spec, console)
    report = run_bench(args, spec, console)
    from chatpager.bench.report import print_report

    print_report(report, console)
    if args.json:
        _write_json(report, args.json, console)
    if args.plot:
        from chatpager.bench.plot import plot_report

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, args.plot)
        console.print(f"plot: {args.plot}")
    return 0


def _write_json(report: dict, path: Path, console) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    console.print(f"report: {path}")


def _bench_server(args: argparse.Namespace, spec: WorkloadSpec, console) -> int:
    from chatpager.bench.http_runner import print_http_report, run_http_bench

    report = run_http_bench(args.server, spec, args.api_key)
    report["command"] = args.command
    print_http_report(report, console)
    if args.json:
        _write_json(report, args.json, console)
    return 1 if report["errors"] else 0


def _bench_single(args: argparse.Namespace, spec: WorkloadSpec, console) -> int:
    import torch

    from chatpager.bench.single import print_single, run_single

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = _load_llm(args)
    report = run_single(llm, None if args.no_llamacpp else args.model, spec, args.single_tokens,
                        not args.no_transformers, console, llama=not args.no_llamacpp)
    report["command"] = args.command
    report["load_average"] = os.getloadavg()[0]
    print_single(report, console)
    if args.json:
        _write_json(report, args.json, console)
    return 0


def _load_llm(args: argparse.Namespace):
    from chatpager.engine.llm import LLM

    kwargs = dict(model=args.model, kv_cache_memory=args.kv_cache_mib * 2**20, block_size=args.block_size,
                  max_num_batched_tokens=args.max_num_batched_tokens, quantization=args.quantization)
    if args.max_model_len is not None:
        return LLM(max_model_len=args.max_model_len, **kwargs)
    try:
        return LLM(max_model_len=DEFAULT_MAX_MODEL_LEN, **kwargs)
    except ValueError as exc:  # checked before the weights load: cheap to retry
        if "exceeds the model's limit" not in str(exc):
            raise
        return LLM(**kwargs)


def run_bench(args: argparse.Namespace, spec: WorkloadSpec, console) -> dict:
    import torch

    from chatpager.bench.chatpager_runner import run_chatpager
    from chatpager.bench.contiguous import allocation_model
    from chatpager.bench.report import build_report
    from chatpager.bench.workload import build_workload
    if args.threads:
        torch.set_num_threads(args.threads)
    sessions = build_workload(spec)
    load_before = os.getloadavg()[0]
    with _progress(console) as bar:
        task = bar.add_task("loading chatpager", total=None)
        llm = _load_llm(args)
        bar.update(task, total=1, completed=1)
        task = bar.add_task("chatpager", total=spec.sessions * spec.turns)
        cp_run, trace = run_chatpager(llm, sessions, spec, lambda n: bar.advance(task, n))
        cp_run.settings["threads"] = torch.get_num_threads()
        serial = static = None
        if args.hf_serial_sessions or args.hf_static_sessions:
            from chatpager.bench.transformers_runner import load_model, TransformersRunner

            task = bar.add_task("loading transformers", total=None)
            hf = TransformersRunner(load_model(llm.model_info["path"]), llm.tokenizer, llm.encode_chat,
                                    llm.engine.eos_token_ids, spec)
            bar.update(task, total=1, completed=1)
            for n, bs, label in ((args.hf_serial_sessions, 1, "transformers serial"),
                                 (args.hf_static_sessions, args.hf_batch, "transformers static batch")):
                if n <= 0:
                    continue
                subset = sessions[:n]
                task = bar.add_task(label, total=len(subset) * spec.turns)
                result = hf.run(subset, bs, lambda k, task=task: bar.advance(task, k))
                result.settings["threads"] = torch.get_num_threads()
                if bs == 1:
                    serial = result
                else:
                    static = result
        llama = None
        if spec.sessions and not args.no_llamacpp:
            llama = _run_llamacpp(args, llm, sessions, spec, bar, console)
    model = llm.model
    contiguous = allocation_model(cp_run.turns, trace.block_size, trace.num_blocks, llm.engine.max_model_len,
                                  spec.max_tokens, model.config.kv_bytes_per_token(model.embed.dtype))
    return build_report(spec, sessions, llm.model_info, args.command, cp_run, trace, contiguous,
                        serial, static, {"before": load_before, "after": os.getloadavg()[0]}, llama)


def _run_llamacpp(args: argparse.Namespace, llm, sessions, spec: WorkloadSpec, bar, console):
    """llama.cpp serving every session one after another, or None (with the reason) when it cannot run."""
    import torch

    from chatpager.bench.llamacpp_runner import llama_cpp_missing, LlamaCppRunner

    missing = llama_cpp_missing(args.model)
    if missing:
        console.print(missing, markup=False)
        return None
    runner = LlamaCppRunner(args.model, llm.tokenizer, llm.encode_chat, llm.engine.eos_token_ids, spec,
                            torch.get_num_threads(), n_ctx=llm.engine.max_model_len)
    task = bar.add_task("llama.cpp sequential", total=len(sessions) * spec.turns)
    return runner.run(sessions, lambda k: bar.advance(task, k))
