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
For each unequal reply the fp32 cache's margin at the first miss (its best logit minus its
second) is reported: misses at near-ties are rounding, not the cache. That count is measured
here and not asserted by a test, because one near-tie flipped by another CPU's float rounding
changes the rest of a reply (tests/engine/model/test_kv_quant.py asserts the teacher-forced
figures instead).

With --rounding-noise the teacher-forced figures are taken over several runs with the candidate's RMSNorm
weights jittered by a few ulps: how far a CPU that rounds differently could move them, which is
what a test's bounds on them must leave room for.

    .venv/bin/python -m chatpager.bench.quality                          # default model: auto vs none/fp32
    .venv/bin/python -m chatpager.bench.quality --kv-cache-dtype int8    # an int8 KV cache vs fp32's
    .venv/bin/python -m chatpager.bench.quality --kv-cache-dtype int8 --rounding-noise 4.8e-7   # their spread
"""
from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Iterator, Sequence

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


def first_miss(model, prompt: Sequence[int], reply: Sequence[int], kv_cache_dtype: str) -> int | None:
    """The first position of `reply` (a greedy reply of another run, maybe ended early by EOS)
    where greedy decoding through a cache of that format, fed the reply, picks another token;
    None where it picks every one (the same reply). One prefill."""
    logits = teacher_forced_logits(model, [*prompt, *reply[:-1]], kv_cache_dtype)
    picks = logits[len(prompt) - 1:].argmax(-1).tolist()
    return next((i for i, (got, want) in enumerate(zip(picks, reply)) if got != want), None)


def predictions(model, docs: list[list[int]], kv_cache_dtype: str = "auto") -> tuple[list[torch.Tensor], float]:
    """Each document's teacher-forced next-token picks through a cache of that format, and the
    text's total negative log-likelihood under the model."""
    picks, nll = [], 0.0
    for ids in docs:
        logits = teacher_forced_logits(model, ids, kv_cache_dtype)[:-1]
        picks.append(logits.argmax(-1))
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=logits.device),
                                                       reduction="sum"))
    return picks, nll


def quality(picks: list[torch.Tensor], nll: float,
            reference_picks: list[torch.Tensor], reference_nll: float) -> Quality:
    """A candidate's `predictions` against a reference's over the same documents."""
    tokens = sum(r.numel() for r in reference_picks)
    agree = sum(int((p == r).sum()) for p, r in zip(picks, reference_picks))
    return Quality(tokens, agree / tokens, math.exp(nll / tokens), math.exp(reference_nll / tokens))


def compare(candidate, reference, docs: list[list[int]], kv_cache_dtype: str = "auto") -> Quality:
    """`candidate` with a KV cache of `kv_cache_dtype` against `reference` with its model dtype's
    (the two may be one LLM)."""
    return quality(*predictions(candidate.model, docs, kv_cache_dtype), *predictions(reference.model, docs))


@dataclass(frozen=True, slots=True)
class GreedyReplies:
    max_tokens: int  # each reply's length compared (or less, where it ended)
    total: int  # chat prompts
    miss_margins: tuple[float, ...]  # per unequal reply: the reference's top-1 minus top-2 logit at its first miss

    @property
    def equal(self) -> int:
        return self.total - len(self.miss_margins)

    def line(self) -> str:
        text = f"greedy {self.max_tokens}-token replies equal for {self.equal}/{self.total} chat prompts"
        if not self.miss_margins:
            return text
        m = sorted(self.miss_margins)
        return (f"{text}; the others first differ where float32's two best logits are {m[0]:.3f} to {m[-1]:.3f} "
                f"apart (median {m[len(m) // 2]:.3f})")


def greedy_replies_equal(llm, kv_cache_dtype: str, max_tokens: int = 32) -> GreedyReplies:
    """Chat prompts of `user_messages.txt` whose greedy reply through a cache of `kv_cache_dtype`
    equals `llm`'s own in its first `max_tokens` tokens, and the margins where the others miss."""
    from chatpager.engine.sampling_params import SamplingParams

    prompts = [llm.encode_chat([{"role": "user", "content": m.strip()}])
               for m in MESSAGES.read_text().splitlines() if m.strip()]
    replies = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))]
    margins = []
    for prompt, reply in zip(prompts, replies):
        miss = first_miss(llm.model, prompt, reply, kv_cache_dtype)
        if miss is not None:
            best = teacher_forced_logits(llm.model, [*prompt, *reply[:miss]])[-1].topk(2).values
            margins.append(float(best[0] - best[1]))
    return GreedyReplies(max_tokens, len(prompts), tuple(margins))


@contextmanager
def jittered_norms(model, eps: float, seed: int) -> Iterator[None]:
    """Every layer's RMSNorm weights scaled by 1 + eps * N(0, 1) inside the block: a stand-in
    for a CPU that rounds differently (at eps = 2^-21 the fp32 logits move by ~1e-4, more than
    this engine's differ from transformers')."""
    gen = torch.Generator().manual_seed(seed)
    saved = [(layer.input_norm, layer.post_norm) for layer in model.layers]
    for layer in model.layers:
        for name in ("input_norm", "post_norm"):
            w = getattr(layer, name)
            setattr(layer, name, w * (1 + eps * torch.randn(w.shape, generator=gen).to(w.device)))
    try:
        yield
    finally:
        for layer, (input_norm, post_norm) in zip(model.layers, saved):
            layer.input_norm, layer.post_norm = input_norm, post_norm


def main() -> None:
    from chatpager.engine.llm import LLM

    p = argparse.ArgumentParser(description="teacher-forced agreement and perplexity vs the fp32 reference")
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="compare the fp32 model reading a KV cache of this format (int8, fp8, bfloat16, ...) instead")
    p.add_argument("--rounding-noise", type=float, default=0.0, metavar="EPS",
                   help="instead: how far other rounding moves the figures, over --runs runs with the candidate's "
                        "RMSNorm weights scaled by 1 + EPS * N(0, 1) (e.g. 4.8e-7, 2^-21)")
    p.add_argument("--runs", type=int, default=6)
    args = p.parse_args()
    kv = args.kv_cache_dtype
    reference = LLM(model=args.model, quantization="none", dtype="float32", num_blocks=1 if kv is None else 1024)
    if kv is None:
        candidate = LLM(model=args.model, quantization=args.quantization, dtype=args.dtype, num_blocks=1)
        label = f"{candidate.model_info['quantization']} / {candidate.model_info['dtype']} vs none / float32"
    else:
        candidate, label = reference, f"kv {kv} vs float32"
    docs = documents(reference.tokenizer)
    ref = predictions(reference.model, docs)
    if args.rounding_noise:
        runs = []
        for seed in range(args.runs):
            with jittered_norms(candidate.model, args.rounding_noise, seed):
                runs.append(quality(*predictions(candidate.model, docs, kv or "auto"), *ref))
            print(f"{label}, norms jittered by {args.rounding_noise:.2g} (seed {seed}): {runs[-1].line()}")
        agree, change = [r.agreement for r in runs], [r.perplexity_change for r in runs]
        print(f"{label} over {len(runs)} runs: top-1 agreement {min(agree):.2%} to {max(agree):.2%}; "
              f"perplexity change {min(change):+.2%} to {max(change):+.2%}")
        return
    result = quality(*predictions(candidate.model, docs, kv or "auto"), *ref)
    if kv is None:
        print(f"{label}: {result.line()}")
        return
    print(f"{label}: {result.line()}; {greedy_replies_equal(reference, kv).line()}")


if __name__ == "__main__":
    main()
