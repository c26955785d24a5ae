"""Quality of a model path against a reference, teacher-forced over a fixed text.

The text (`quality_text.txt`: prose, a story, a how-to, code, a chat; documents separated by a
line `===`) is fed to each model one document at a time as a single prefill through the
engine's own `Model` and torch attention, with a KV cache of its own (the engine's pool is not
touched). At every position both models predict the next token of the text; we report how often
their top choices agree and each model's perplexity on the text.

With --kv-cache-dtype the candidate is the float32 model itself reading a cache of that format,
and greedy 32-token replies to chat prompts (`user_messages.txt`) are compared too: a reply is
equal iff, fed the fp32 cache's reply, the candidate's argmax at every reply position is that
reply's token (up to the first miss both runs see the same tokens), so one prefill per prompt.

    .venv/bin/python -m chatpager.bench.quality                          # default model: auto vs none/fp32
    .venv/bin/python -m chatpager.bench.quality --kv-cache-dtype int8    # an int8 KV cache vs fp32's
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Sequence

import torch

from chatpager.engine.model.attention import AttentionMetadata, select_backend
from chatpager.engine.model.kv_cache import KVCache
from chatpager.engine.model.kv_quant import resolve_kv_format

TEXT = Path(__file__).with_name("quality_text.txt")
MESSAGES = Path(__file__).with_name("user_messages.txt")
BLOCK = 16


@dataclass(frozen=True, slots=True)
class Quality:
    tokens: int  # predictions compared
    agreement: float  # fraction of positions where both models' argmax agree
    perplexity: float  # candidate's
    reference_perplexity: float

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.reference_perplexity - 1

    def line(self) -> str:
        return (f"{self.tokens} tokens: top-1 agreement {self.agreement:.2%}; perplexity {self.perplexity:.3f} "
                f"vs {self.reference_perplexity:.3f} ({self.perplexity_change:+.2%})")


def documents(tokenizer, path: Path = TEXT) -> list[list[int]]:
    return [tokenizer.encode(d.strip()) for d in path.read_text().split("\n===\n")]


@torch.inference_mode()
def prefill_hidden(model, ids: Sequence[int], kv_cache_dtype: str = "auto") -> torch.Tensor:
    """The final hidden states [len(ids), hidden] of one sequence, run as a single prefill
    through a KV cache of that format (`chatpager.engine.model.kv_quant`)."""
    c = model.config
    n, dev = len(ids), model.embed.device
    blocks = -(-n // BLOCK)
    fmt = resolve_kv_format(kv_cache_dtype, model.embed.dtype, dev)
    kv = KVCache(c.num_layers, blocks, BLOCK, c.num_kv_heads, c.head_dim, fmt.storage, dev, scaled=fmt.quantized)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev).unsqueeze(0),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
    )
    backend = select_backend("torch", dev, kv_quantized=fmt.quantized)
    backend.plan(meta, BLOCK)
    return model.forward(torch.tensor(ids, device=dev), torch.arange(n, device=dev), kv, meta, backend)


def teacher_forced_logits(model, ids: Sequence[int], kv_cache_dtype: str = "auto") -> torch.Tensor:
    """float32 [len(ids), vocab]: row i predicts token i + 1."""
    return model.logits(prefill_hidden(model, ids, kv_cache_dtype))


def same_greedy_reply(model, prompt: Sequence[int], reply: Sequence[int], kv_cache_dtype: str) -> bool:
    """Whether greedy decoding through a cache of that format continues `prompt` with `reply`
    (a greedy reply of another run, maybe ended early by EOS): true iff its argmax at every
    reply position, fed the reply, is that reply's token."""
    logits = teacher_forced_logits(model, [*prompt, *reply[:-1]], kv_cache_dtype)
    return logits[len(prompt) - 1:].argmax(-1).tolist() == list(reply)


def compare(candidate, reference, docs: list[list[int]], kv_cache_dtype: str = "auto") -> Quality:
    """`candidate` with a KV cache of `kv_cache_dtype` against `reference` with its model dtype's
    (the two may be one LLM)."""
    agree = total = 0
    nll = [0.0, 0.0]
    for ids in docs:
        target = torch.tensor(ids[1:])
        picks = []
        for i, (llm, kv) in enumerate(((candidate, kv_cache_dtype), (reference, "auto"))):
            logits = teacher_forced_logits(llm.model, ids, kv)[:-1]
            nll[i] += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            picks.append(logits.argmax(-1))
        agree += int((picks[0] == picks[1]).sum())
        total += len(ids) - 1
    return Quality(total, agree / total, math.exp(nll[0] / total), math.exp(nll[1] / total))


def greedy_replies_equal(llm, kv_cache_dtype: str, max_tokens: int = 32) -> tuple[int, int]:
    """(equal, total): chat prompts of `user_messages.txt` whose greedy reply through a cache of
    `kv_cache_dtype` equals `llm`'s own in its first `max_tokens` tokens."""
    from chatpager.engine.sampling_params import SamplingParams

    prompts = [llm.encode_chat([{"role": "user", "content": m.strip()}])
               for m in MESSAGES.read_text().splitlines() if m.strip()]
    replies = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))]
    return sum(same_greedy_reply(llm.model, p, r, kv_cache_dtype) for p, r in zip(prompts, replies)), len(prompts)


def main() -> None:
    from chatpager.engine.llm import LLM

    p = argparse.ArgumentParser(description="teacher-forced agreement and perplexity vs the fp32 reference")
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="compare the fp32 model reading a KV cache of this format (int8, fp8, bfloat16, ...) instead")
    args = p.parse_args()
    reference = LLM(model=args.model, quantization="none", dtype="float32",
                    num_blocks=1 if args.kv_cache_dtype is None else 1024)
    docs = documents(reference.tokenizer)
    if args.kv_cache_dtype is not None:
        result = compare(reference, reference, docs, args.kv_cache_dtype)
        equal, total = greedy_replies_equal(reference, args.kv_cache_dtype)
        print(f"kv {args.kv_cache_dtype} vs float32: {result.line()}; "
              f"greedy 32-token replies equal for {equal}/{total} chat prompts")
        return
    candidate = LLM(model=args.model, quantization=args.quantization, dtype=args.dtype, num_blocks=1)
    result = compare(candidate, reference, docs)
    print(f"{candidate.model_info['quantization']} / {candidate.model_info['dtype']} vs none / float32: {result.line()}")


if __name__ == "__main__":
    main()
