"""Decode throughput: chatpager vs transformers' batched `generate`, same prompts, one run.

N concurrent sequences (default 16), each generating exactly T new tokens (default 64, EOS
ignored), greedy, on the default model (or --model). transformers runs them as one static
batch with left padding, as its users do. Both are timed end to end (prefill included) and,
for the decode-only figure, with the prefill step subtracted: transformers via a 1-token
generate on the same batch, chatpager via the time of its first step.

    .venv/bin/python benchmarks/decode_vs_transformers.py [--seqs 16] [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from chatpager import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.", "Explain recursion simply.",
    "List three uses of copper.", "Why do cats purr?", "How does a bicycle stay upright?",
    "Give me a tip for learning Python.", "What is photosynthesis?", "Describe the color blue to a blind person.",
    "What causes tides?", "Suggest a name for a goldfish.", "How do vaccines work?",
    "What is the speed of light?", "Summarize the plot of Hamlet.", "Why is the sea salty?",
    "What is a prime number?",
]


def chatpager_run(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """(total seconds, seconds of the first step = the prefill of all prompts)."""
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        eng.add_request(p, params)
    eng.step()
    first = time.perf_counter() - start
    while eng.has_unfinished():
        eng.step()
    return time.perf_counter() - start, first


def hf_run(model, tok, prompts: list[list[int]], tokens: int) -> float:
    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=pad)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    llm = LLM(model=args.model, enable_prefix_caching=False)
    hf = AutoModelForCausalLM.from_pretrained(llm.model_info["path"], dtype=torch.float32).eval()
    system = {"role": "system", "content": "You are a helpful assistant."}
    prompts = [llm.encode_chat([system, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.seqs)]
    n_out = args.seqs * args.tokens
    best = {"cp": float("inf"), "cp_decode": float("inf"), "hf": float("inf"), "hf_decode": float("inf")}
    for _ in range(args.repeats):  # interleaved, best of N: the two see the same machine state
        total, prefill = chatpager_run(llm, prompts, args.tokens)
        best["cp"] = min(best["cp"], total)
        best["cp_decode"] = min(best["cp_decode"], total - prefill)
        hf_total = hf_run(hf, llm.tokenizer, prompts, args.tokens)
        hf_prefill = hf_run(hf, llm.tokenizer, prompts, 1)
        best["hf"] = min(best["hf"], hf_total)
        best["hf_decode"] = min(best["hf_decode"], hf_total - hf_prefill)
    decode_tokens = args.seqs * (args.tokens - 1)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {llm.model_info['name']}; {args.seqs} seqs x {args.tokens} tokens")
    print(f"{'':14}{'end-to-end tok/s':>18}{'decode tok/s':>14}")
    print(f"{'chatpager':14}{n_out / best['cp']:>18.1f}{decode_tokens / best['cp_decode']:>14.1f}")
    print(f"{'transformers':14}{n_out / best['hf']:>18.1f}{decode_tokens / best['hf_decode']:>14.1f}")


if __name__ == "__main__":
    main()
