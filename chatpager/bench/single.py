"""`chatpager bench --single`: one chat, one reply of N greedy tokens (128 by default), on
chatpager, transformers `generate` (batch 1) and llama.cpp on the same GGUF — what a person
chatting alone waits for. Every reply is exactly N tokens (EOS ignored) so the runners do the
same work; the prompt is the workload's first session's first turn.

Figures per runner: TTFT (prompt to first token), decode tokens/s (tokens after the first over
the time after it), and end-to-end tokens/s (N over the whole reply).
"""
from __future__ import annotations

import time

import torch

from chatpager.bench.workload import WorkloadSpec, build_workload


def _figures(name: str, n: int, start: float, first: float, end: float, tokens: list[int], **extra) -> dict:
    return {"runner": name, "tokens": len(tokens), "token_ids": tokens, "ttft_s": first - start,
            "decode_tokens_per_s": (n - 1) / (end - first) if end > first else 0.0,
            "tokens_per_s": n / (end - start), **extra}


def run_chatpager_single(llm, prompt: list[int], n: int) -> dict:
    from chatpager.engine.sampling_params import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    eng.add_request(prompt[:8], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up, not timed
    while eng.has_unfinished():
        eng.step()
    start = time.perf_counter()
    eng.add_request(prompt, params)
    first, tokens = None, []
    while eng.has_unfinished():
        for out in eng.step():
            if out.token_ids and first is None:
                first = time.perf_counter()
            if out.finished:
                tokens = list(out.token_ids)
    end = time.perf_counter()
    return _figures("chatpager", n, start, first or end, end, tokens,
                    quantization=llm.model_info.get("quantization"), threads=torch.get_num_threads())


def run_transformers_single(model_dir: str, prompt: list[int], n: int) -> dict:
    from chatpager.bench.transformers_runner import FirstLogits, load_model

    model = load_model(model_dir)
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=None,
                  attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=2, **kwargs)  # warm-up
        timer = FirstLogits()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, logits_processor=[timer], **kwargs)
        end = time.perf_counter()
    return _figures("transformers generate", n, start, timer.at or end, end, out[0, len(prompt):].tolist(),
                    threads=torch.get_num_threads())


def run_llamacpp_single(model: str | None, tokenizer, prompt: list[int], n: int, threads: int) -> dict:
    from chatpager.bench.llamacpp_runner import LlamaCppRunner

    runner = LlamaCppRunner(model, tokenizer, None, set(), WorkloadSpec(), threads, n_ctx=len(prompt) + n + 16)
    runner.generate(prompt[:8], 2, ignore_eos=True)  # warm-up
    runner.llm.reset()
    start = time.perf_counter()
    tokens, first, end = runner.generate(prompt, n, ignore_eos=True)
    return _figures("llama.cpp", n, start, first, end, tokens, threads=threads)


def run_single(llm, model: str | None, spec: WorkloadSpec, n: int, with_transformers: bool,
               console, llama: bool = True) -> dict:
    from chatpager.bench.llamacpp_runner import llama_cpp_missing

    session = build_workload(spec)[0]
    prompt = llm.encode_chat(session.messages(0, []))
    runs = [run_chatpager_single(llm, prompt, n)]
    if with_transformers:
        runs.append(run_transformers_single(llm.model_info["path"], prompt, n))
    missing = llama_cpp_missing(model) if llama else "llama.cpp skipped (--no-llamacpp)"
    if missing:
        console.print(missing, markup=False)
    else:
        runs.append(run_llamacpp_single(model, llm.tokenizer, prompt, n, torch.get_num_threads()))
    ours = runs[0]["tokens_per_s"]
    for r in runs[1:]:
        r["chatpager_speedup"] = ours / r["tokens_per_s"] if r["tokens_per_s"] else None
        r["same_tokens_as_chatpager"] = _common_prefix(r.get("token_ids", []), runs[0].get("token_ids", []))
    return {"prompt_tokens": len(prompt), "new_tokens": n, "runs": runs, "model": llm.model_info}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def print_single(report: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"One chat: {report['prompt_tokens']}-token prompt, {report['new_tokens']} greedy tokens")
    for col in ("runner", "TTFT s", "decode tok/s", "end-to-end tok/s", "chatpager speed-up", "threads"):
        t.add_column(col, justify="left" if col == "runner" else "right")
    for r in report["runs"]:
        up = r.get("chatpager_speedup")
        t.add_row(r["runner"] + (f" ({r['quantization']})" if r.get("quantization") else ""),
                  f"{r['ttft_s']:.3f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['tokens_per_s']:.1f}",
                  "—" if up is None else f"{up:.2f}×", str(r.get("threads", "—")))
    console.print(t)
