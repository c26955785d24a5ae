"""The batched LoRA delta: every adapter of a step applied by one pair of bmms per projection.

The model fuses q/k/v and gate/up into one linear each; `FUSED` names the PEFT modules inside
each. For every layer and fused linear, `LoraWeights` stacks all resident adapters by slot:

    a   [S, M * R, in]    slot s, sub-module m, rank row k at [s, m * R + k]
    b_t [S, M * R, out]   (B * scaling).T of sub-module m in its own output columns, zeros elsewhere

(S adapters, M sub-modules, R the largest rank; smaller ranks and modules an adapter does not
target are zero-padded, which adds exactly nothing). Once per step, `LoraBatch` groups the rows
(tokens) that use an adapter by adapter: `rows` [G, L] holds the rows of each of the G adapters
used, padded to the largest group with row 0, whose results are zeroed. Each projection then
runs, with no loop over requests or adapters:

    xa    = bmm(x[rows], a[slots].T)      [G, L, M * R]   (padded entries zeroed)
    delta = bmm(xa, b_t[slots])           [G, L, out]
    y.index_add_(0, rows, delta)          rows without an adapter get nothing added

Only the adapters a step uses are read (`a[slots]` is a view of the stack when they are a run
of slots: one adapter, or all of them), and rows without an adapter cost nothing. The delta is
added to the base linear's output whatever its weights are stored in (dense float, int8,
int4), in the activations' dtype; `y` must be the linear's own fresh output (it is added to in
place). A step with no adapter row skips all of it (the runner passes no LoraBatch).
Measured (benchmarks/lora_overhead.py, default model, 16 sequences decoding, 4 rank-16
adapters on every projection, 2 busy cores): +15-18% a step with every sequence on an
adapter, ~+10% with one of them on one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from chatpager.engine.config import ModelConfig
from chatpager.engine.model.lora import LoraAdapter, module_shapes

FUSED: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                     "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


@dataclass(frozen=True, slots=True)
class LoraStack:
    """One fused linear of one layer, every adapter stacked (see the module docstring)."""

    a: torch.Tensor  # [S, M * R, in]
    b_t: torch.Tensor  # [S, M * R, out]


class LoraWeights:
    """The resident adapters of a model, stacked per layer and fused linear; slot i = adapters[i]."""

    def __init__(self, adapters: Sequence[LoraAdapter], config: ModelConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.slot_of = {adapter.name: i for i, adapter in enumerate(adapters)}
        self.rank = max(adapter.rank for adapter in adapters)
        shapes = module_shapes(config)
        # None where no adapter targets any sub-module of that linear: nothing to add there
        self.stacks: list[dict[str, LoraStack | None]] = [
            {fused: _stack(adapters, layer, subs, shapes, self.rank, dtype, device)
             for fused, subs in FUSED.items()}
            for layer in range(config.num_layers)]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.slot_of)

    def batch(self, loras: Sequence[str | None], num_tokens: Sequence[int],
              device: torch.device) -> LoraBatch | None:
        """The step's row groups, from each sequence's adapter and token count (the sequences'
        tokens are packed in this order); None when no sequence of the step uses an adapter."""
        groups: dict[int, list[int]] = {}
        start = 0
        for name, n in zip(loras, num_tokens):
            if name is not None:
                groups.setdefault(self.slot_of[name], []).extend(range(start, start + n))
            start += n
        if not groups:
            return None
        slots = sorted(groups)
        sizes = [len(groups[s]) for s in slots]
        width = max(sizes)
        rows = torch.tensor([groups[s] + [0] * (width - len(groups[s])) for s in slots], device=device)
        padding = None
        if min(sizes) < width:
            lengths = torch.tensor(sizes, device=device)
            padding = (torch.arange(width, device=device)[None, :] >= lengths[:, None]).unsqueeze(-1)
        if slots == list(range(slots[0], slots[-1] + 1)):  # a run of slots: the stacks' view, no copy
            picked: slice | torch.Tensor = slice(slots[0], slots[-1] + 1)
        else:
            picked = torch.tensor(slots, device=device)
        return LoraBatch(self, picked, rows, padding)


@dataclass(frozen=True, slots=True)
class LoraBatch:
    weights: LoraWeights
    slots: slice | torch.Tensor  # the G adapters this step uses, in order: a slice when they are a run
    rows: torch.Tensor  # int64 [G, L]: each adapter's rows (token indices), padded with row 0
    padding: torch.Tensor | None  # bool [G, L, 1]: True at padded entries; None when there are none

    def add(self, layer: int, fused: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the base linear's fresh output for `x`) plus each row's own adapter delta."""
        stack = self.weights.stacks[layer][fused]
        if stack is None:
            return y
        a, b_t = stack.a[self.slots], stack.b_t[self.slots]
        xa = torch.bmm(x[self.rows], a.transpose(1, 2))
        if self.padding is not None:
            xa.masked_fill_(self.padding, 0)
        delta = torch.bmm(xa, b_t)
        return y.index_add_(0, self.rows.view(-1), delta.view(-1, delta.shape[-1]))


def with_lora(y: torch.Tensor, x: torch.Tensor, lora: LoraBatch | None, layer: int, fused: str) -> torch.Tensor:
    """The model's hook: `y` unchanged without adapters this step, else `y` plus the deltas."""
    return y if lora is None else lora.add(layer, fused, x, y)


def _stack(adapters: Sequence[LoraAdapter], layer: int, subs: tuple[str, ...],
           shapes: dict[str, tuple[int, int]], rank: int, dtype: torch.dtype,
           device: torch.device) -> LoraStack | None:
    if not any((layer, sub) in adapter.weights for adapter in adapters for sub in subs):
        return None
    fan_in = shapes[subs[0]][0]
    outs = [shapes[sub][1] for sub in subs]
    s, m = len(adapters), len(subs)
    a = torch.zeros(s, m, rank, fan_in, dtype=dtype, device=device)
    b_t = torch.zeros(s, m, rank, sum(outs), dtype=dtype, device=device)
    for i, adapter in enumerate(adapters):
        start = 0
        for j, (sub, out) in enumerate(zip(subs, outs)):
            pair = adapter.weights.get((layer, sub))
            if pair is not None:
                lora_a, lora_b = pair
                r = lora_a.shape[0]
                a[i, j, :r] = lora_a
                b_t[i, j, :r, start:start + out] = lora_b.T
            start += out
    return LoraStack(a.view(s, m * rank, fan_in), b_t.view(s, m * rank, sum(outs)))
