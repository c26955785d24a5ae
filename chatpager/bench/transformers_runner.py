"""Run the workload on transformers' `generate`, the way its users run a chat.

There is no cache across calls, so every turn re-sends the whole history. Two ways:
- `serial`: one session at a time, one turn at a time (batch 1, no padding);
- `static`: sessions in fixed batches; turn k of a batch is one left-padded `generate` call,
  started when every reply of turn k-1 in that batch is done.
Greedy, same reply cap and EOS handling as chatpager. TTFT comes from a logits processor that
notes when the first step's logits exist (prefill done).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from chatpager.bench.chatpager_runner import reply_text
from chatpager.bench.results import RunResult, TurnRecord
from chatpager.bench.workload import Message, Session, WorkloadSpec

Encode = Callable[[list[Message]], list[int]]
Progress = Callable[[int], None]


class FirstLogits:
    """A logits processor that only records when it is first called."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the bench draws its own

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


class TransformersRunner:
    def __init__(self, model, tokenizer, encode: Encode, eos_token_ids: set[int], spec: WorkloadSpec) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.encode = encode
        self.eos = sorted(eos_token_ids)
        self.spec = spec
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]

    def run(self, sessions: list[Session], batch_size: int, progress: Progress | None = None) -> RunResult:
        """batch_size 1 is the serial way; above 1, static batches of that many sessions."""
        records: list[TurnRecord] = []
        start = time.perf_counter()
        for b in range(0, len(sessions), batch_size):
            group = sessions[b:b + batch_size]
            replies: dict[int, list[str]] = {s.index: [] for s in group}
            for turn in range(self.spec.turns):
                prompts = [self.encode(s.messages(turn, replies[s.index])) for s in group]
                submitted = time.perf_counter() - start
                outputs, first, end = self._generate(prompts)
                for s, prompt, out in zip(group, prompts, outputs):
                    records.append(TurnRecord(s.index, turn + 1, len(prompt), submitted, first - start,
                                              end - start, prompt_ids=prompt, output_ids=out))
                    replies[s.index].append(reply_text(self.tokenizer, out))
                if progress:
                    progress(len(group))
        wall = time.perf_counter() - start
        name = "transformers serial" if batch_size == 1 else "transformers static batch"
        return RunResult(name, wall, records, {"batch_size": batch_size})

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]]) -> tuple[list[list[int]], float, float]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        timer = FirstLogits()
        r = self.spec.max_tokens
        kwargs = dict(max_new_tokens=r, do_sample=False, temperature=None, top_p=None, top_k=None,
                      pad_token_id=self.pad, logits_processor=[timer])
        if self.spec.ignore_eos:
            kwargs.update(eos_token_id=None, min_new_tokens=r)
        else:
            kwargs.update(eos_token_id=self.eos)
        out = self.model.generate(ids, attention_mask=mask, **kwargs)
        end = time.perf_counter()
        new = out[:, width:].tolist()
        return [self._trim(row) for row in new], timer.at or end, end

    def _trim(self, row: list[int]) -> list[int]:
        """Generated tokens up to and including the first EOS (the rest is batch padding)."""
        if self.spec.ignore_eos:
            return row
        for i, tok in enumerate(row):
            if tok in self.eos:
                return row[:i + 1]
        return row
