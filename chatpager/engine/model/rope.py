"""Rotary position embedding tables, for the default and every scaled variant transformers knows.

Default, dynamic (equal to default within the original context), linear and Llama 3 scaling are
computed here; the rarer variants (yarn, longrope, ...) use transformers' formulas, which
imports it at load for those models only."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from chatpager.engine.config import ModelConfig


def rope_tables(config: "ModelConfig", max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_positions, head_dim] (halves duplicated, Hugging Face layout)."""
    params, head_dim = config.rope_parameters, config.head_dim
    rope_type = params["rope_type"]
    scaling = 1.0
    if rope_type in ("default", "dynamic", "linear", "llama3"):
        # dynamic NTK equals default up to the original context; the engine caps max_model_len there
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_frequencies(inv_freq, params)
    else:  # other scaled variants: transformers' own formulas, on its config (imported only for these)
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            from chatpager.errors import ModelLoadError

            raise ModelLoadError(f"unsupported RoPE scaling type {rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](AutoConfig.for_model(**config.raw), torch.device("cpu"))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _llama3_frequencies(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1's long-context scaling: wavelengths shorter than the original context / the
    high-frequency factor keep their frequency, those longer than context / the low-frequency
    factor are slowed by `factor`, and the band between blends the two linearly in
    context / wavelength (the order of operations is transformers', so the floats agree)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slow = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelen - low) / (high - low)
    blended = (1 - blend) * slow / factor + blend * slow
    in_band = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(in_band, blended, slow)


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
