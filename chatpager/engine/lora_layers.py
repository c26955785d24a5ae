"""The batched LoRA delta: every adapter of a step applied in one pair of matmuls per projection.

The model fuses q/k/v and gate/up into one linear each; `FUSED` names the PEFT modules inside
each. For every layer and fused linear, `LoraWeights` stacks all resident adapters:

    a [S * M * R, in]    slot s, sub-module m, rank row k at row (s * M + m) * R + k
    b [out, S * M * R]   B * scaling of sub-module m in its own output rows, zeros elsewhere

(S adapters, M sub-modules, R the largest rank; smaller ranks and modules an adapter does not
target are zero-padded). A step's `LoraBatch` knows each token's slot (-1: no adapter) and adds

    delta = ((x @ a.T) * mask) @ b.T,   mask[t, c] = (slot of column c == slot of token t)

so rows of different adapters, and rows with none, share the step: no loop over requests or
adapters, the mask keeps every row to its own adapter's columns, and a row without one gets an
exact zero. The delta is added to the base linear's output whatever its weights are stored in
(dense float, int8, int4), in the activations' dtype. Cost per projection: two matmuls of width
S * M * R beside the base one (S = 4, R = 8: 96 columns for q/k/v against 960 for the default
model); a step with no adapter row skips it (the runner passes no LoraBatch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from chatpager.engine.config import ModelConfig
from chatpager.engine.lora import LoraAdapter, module_shapes

FUSED: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                     "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


@dataclass(frozen=True, slots=True)
class LoraStack:
    """One fused linear of one layer, every adapter stacked (see the module docstring)."""

    a: torch.Tensor  # [S * M * R, in]
    b_t: torch.Tensor  # [S * M * R, out]: b transposed, so the second matmul reads it row-major
    col_slot: torch.Tensor  # int64 [S * M * R]: the adapter slot of each column


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
        """The step's per-token adapter slots, from each sequence's adapter and token count;
        None when no sequence of the step uses an adapter."""
        slots = [-1 if name is None else self.slot_of[name] for name in loras]
        if all(s < 0 for s in slots):
            return None
        per_seq = torch.tensor(slots, dtype=torch.int64, device=device)
        counts = torch.tensor(num_tokens, dtype=torch.int64, device=device)
        return LoraBatch(self, torch.repeat_interleave(per_seq, counts))


@dataclass(slots=True)
class LoraBatch:
    weights: LoraWeights
    token_slot: torch.Tensor  # int64 [num_tokens]: each token's adapter slot, -1 for none
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)  # by stack width, built once a step

    def add(self, layer: int, fused: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the base linear's output for `x`) plus each row's own adapter delta."""
        stack = self.weights.stacks[layer][fused]
        if stack is None:
            return y
        width = stack.col_slot.shape[0]
        mask = self._masks.get(width)
        if mask is None:  # equal widths have equal column layouts: one mask serves every layer
            mask = self._masks[width] = (self.token_slot[:, None] == stack.col_slot[None, :]).to(x.dtype)
        xa = (x @ stack.a.T).mul_(mask)
        return torch.addmm(y, xa, stack.b_t)


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
    col_slot = torch.arange(s, device=device).repeat_interleave(m * rank)
    return LoraStack(a.reshape(s * m * rank, fan_in), b_t.reshape(s * m * rank, sum(outs)), col_slot)
