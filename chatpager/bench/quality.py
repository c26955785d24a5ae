"""Quality of a model path against a reference, teacher-forced over a fixed text.

The text (`quality_text.txt`: prose, a story, a how-to, code, a chat; documents separated by a
line `===`) is fed to each model one document at a time as a single prefill through the
engine's own `Model` and torch attention, with a KV cache of its own (the engine's pool is not
touched). At every position both models predict the next token of the text; we report how often
their top choices agree and each model's perplexity on the text.

    .venv/bin/python -m chatpager.bench.quality            # default model: auto vs none/fp32
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from chatpager.engine.attention import AttentionMetadata, select_backend
from chatpager.engine.kv_cache import KVCache

TEXT = Path(__file__).with_name("quality_text.txt")
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
def prefill_hidden(model, ids: list[int]) -> torch.Tensor:
    """The final hidden states [len(ids), hidden] of one sequence, run as a single prefill."""
    c = model.config
    n, dev = len(ids), model.embed.device
    blocks = -(-n // BLOCK)
    kv = KVCache(c.num_layers, blocks, BLOCK, c.num_kv_heads, c.head_dim, model.embed.dtype, dev)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev).unsqueeze(0),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
    )
    backend = select_backend("torch", dev)
    backend.plan(meta, BLOCK)
    return model.forward(torch.tensor(ids, device=dev), torch.arange(n, device=dev), kv, meta, backend)


def teacher_forced_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 [len(ids), vocab]: row i predicts token i + 1."""
    return model.logits(prefill_hidden(model, ids))


def compare(candidate, reference, docs: list[list[int]]) -> Quality:
    agree = total = 0
    nll = {id(candidate): 0.0, id(reference): 0.0}
    for ids in docs:
        target = torch.tensor(ids[1:])
        picks = {}
        for llm in (candidate, reference):
            logits = teacher_forced_logits(llm.model, ids)[:-1]
            nll[id(llm)] += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            picks[id(llm)] = logits.argmax(-1)
        agree += int((picks[id(candidate)] == picks[id(reference)]).sum())
        total += len(ids) - 1
    return Quality(total, agree / total, math.exp(nll[id(candidate)] / total), math.exp(nll[id(reference)] / total))


def main() -> None:
    from chatpager import LLM

    p = argparse.ArgumentParser(description="teacher-forced agreement and perplexity vs the fp32 reference")
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    reference = LLM(model=args.model, quantization="none", dtype="float32", num_blocks=1)
    candidate = LLM(model=args.model, quantization=args.quantization, dtype=args.dtype, num_blocks=1)
    result = compare(candidate, reference, documents(reference.tokenizer))
    print(f"{candidate.model_info['quantization']} / {candidate.model_info['dtype']} vs none / float32: {result.line()}")


if __name__ == "__main__":
    main()
