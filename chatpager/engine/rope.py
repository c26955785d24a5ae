"""Rotary position embedding tables, for the default and every scaled variant transformers knows."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from chatpager.engine.config import ModelConfig


def rope_tables(config: "ModelConfig", max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_positions, head_dim] (halves duplicated, Hugging Face layout)."""
    params, head_dim = config.rope_parameters, config.head_dim
    rope_type = params["rope_type"]
    if rope_type in ("default", "dynamic"):
        # dynamic NTK equals default up to the original context; the engine caps max_model_len there
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        scaling = 1.0
    else:  # scaled variants: transformers' own formulas, on its config (imported only for these models)
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            from chatpager.errors import ModelLoadError

            raise ModelLoadError(f"unsupported RoPE scaling type {rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](AutoConfig.for_model(**config.raw), torch.device("cpu"))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rope_for_positions(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for one step's tokens, shaped to broadcast over heads: cos [n, 1, d], and sin with
    its first half negated, so that `apply_rope` needs no concatenation."""
    half = cos.shape[-1] // 2
    sin = sin[positions]
    return cos[positions].unsqueeze(1), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; tables from `rope_for_positions`. Hugging Face's
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): swapping the halves is one
    flip, the minus sign sits in the table, and the products are the same floats."""
    n, heads, d = x.shape
    swapped = x.view(n, heads, 2, d // 2).flip(2).view(n, heads, d)
    return x * cos + swapped * signed_sin
