"""Llama-family decoder over packed tokens (no padding), reading K/V only through the backend.

Covers the llama, mistral, qwen2 (qkv bias) and qwen3 (per-head q/k RMSNorm) layouts: RMSNorm,
RoPE (scaled variants included), grouped-query attention, SwiGLU MLP, tied or untied embeddings.
q/k/v and gate/up projections are fused into one matmul each at load time. Every projection is
a `quantization.Linear` (dense, int8 or int4, chosen once at load); norms, RoPE and attention
run in the model dtype whatever the weights are stored in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from chatpager.engine.config import ModelConfig
from chatpager.engine.model.attention import AttentionBackend, AttentionMetadata
from chatpager.engine.model.gguf_weights import GroupedInt4
from chatpager.engine.model.kv_cache import KVCache
from chatpager.engine.model.lora_layers import LoraBatch, with_lora
from chatpager.engine.model.quantization import (cat_int4, DenseLinear, int4_linear, int8_linear, Linear, quantize_int4,
                                                 ShortlistHead)
from chatpager.engine.model.rope import apply_rope, rope_for_positions, rope_tables
from chatpager.errors import ModelLoadError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def normed_linear(linear: Linear, h: torch.Tensor, weight: torch.Tensor, eps: float,
                  keep_input: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(rms_norm(h), linear of it). A linear that can fuse the norm (`cpu_int4.Int4Matmul.normed`)
    does it in its own pass over h, and the normed input is then never made (None) unless
    `keep_input` (LoRA's delta reads it)."""
    fused = getattr(linear, "normed", None)
    if fused is not None and not keep_input and h.dtype == torch.float32:
        return None, fused(h, weight, eps)
    x = rms_norm(h, weight, eps)
    return x, linear(x)


def swiglu_linear(linear: Linear, gate_up: torch.Tensor,
                  keep_input: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(silu(gate) * up, linear of it), fused where the linear can (`cpu_int4.Int4Matmul.swiglu`),
    as `normed_linear` does for the norm."""
    fused = getattr(linear, "swiglu", None)
    if fused is not None and not keep_input and gate_up.dtype == torch.float32:
        return None, fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up
    return act, linear(act)


@dataclass(slots=True)
class Layer:
    input_norm: torch.Tensor
    qkv: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class Model:
    """`quantization` is "none", "int8" or "int4" (already resolved); `int4_weights` are a GGUF
    file's own 4-bit codes by Hugging Face name, used for "int4" instead of quantizing floats."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, max_positions: int, quantization: str = "none",
                 int4_weights: Mapping[str, GroupedInt4] | None = None) -> None:
        self.config = config
        self.scale = config.head_dim ** -0.5
        self.quantization = quantization
        int4_weights = int4_weights or {}

        def raw(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"checkpoint lacks tensor {name!r}")
            return weights[name]

        def take(name: str) -> torch.Tensor:
            return raw(name).to(device=device, dtype=dtype)

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        def linear(names: list[str], bias: torch.Tensor | None = None) -> Linear:
            if quantization == "int4":
                parts = [int4_weights[n] if n in int4_weights else quantize_int4(raw(n)) for n in names]
                return int4_linear(cat_int4(parts), bias)
            if quantization == "int8":
                return int8_linear(torch.cat([raw(n) for n in names]), bias)
            return DenseLinear(torch.cat([take(n) for n in names]), bias)

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        tied = config.tie_word_embeddings or "lm_head.weight" not in weights
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        head_weight = self.embed if tied else take(head)
        if quantization == "none":
            self.lm_head: Linear = DenseLinear(head_weight)
        else:  # the best tokens rescored exactly: the head's error lands straight on the logits
            if quantization == "int4":
                coarse = int4_linear(int4_weights[head] if head in int4_weights else quantize_int4(head_weight))
            else:
                coarse = int8_linear(head_weight)
            self.lm_head = ShortlistHead(coarse, head_weight)
        self.layers: list[Layer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            biases = [maybe(a + f"{n}_proj.bias") for n in "qkv"]
            self.layers.append(Layer(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=linear([a + f"{n}_proj.weight" for n in "qkv"],
                           torch.cat(biases) if all(b is not None for b in biases) else None),
                q_norm=maybe(a + "q_norm.weight") if config.qk_norm else None,
                k_norm=maybe(a + "k_norm.weight") if config.qk_norm else None,
                o=linear([a + "o_proj.weight"]),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                down=linear([p + "mlp.down_proj.weight"]),
            ))
        cos, sin = rope_tables(config, max_positions)
        self.cos, self.sin = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, attention: AttentionBackend,
                lora: LoraBatch | None = None) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm. `lora`: the step's
        adapters (lora_layers.py), each projection's delta added to its output."""
        c = self.config
        n = input_ids.shape[0]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos, sin = rope_for_positions(self.cos, self.sin, positions)
        h = F.embedding(input_ids, self.embed)
        keep = lora is not None
        for i, layer in enumerate(self.layers):
            x, qkv = normed_linear(layer.qkv, h, layer.input_norm, c.rms_norm_eps, keep)
            qk, v = with_lora(qkv, x, lora, i, "qkv").split([q_size + kv_size, kv_size], dim=-1)
            qk = qk.view(n, c.num_heads + c.num_kv_heads, c.head_dim)
            v = v.view(n, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None:
                qk = torch.cat([rms_norm(qk[:, :c.num_heads], layer.q_norm, c.rms_norm_eps),
                                rms_norm(qk[:, c.num_heads:], layer.k_norm, c.rms_norm_eps)], dim=1)
            qk = apply_rope(qk, cos, sin)  # q and k rotated together: one set of ops per layer
            q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]
            k_cache, v_cache = kv_cache.layer(i)
            o = attention(q, k, v, k_cache, v_cache, meta, self.scale, scales=kv_cache.layer_scales(i))
            o = o.reshape(n, q_size)
            h = h + with_lora(layer.o(o), o, lora, i, "o")
            x, gate_up = normed_linear(layer.gate_up, h, layer.post_norm, c.rms_norm_eps, keep)
            act, down = swiglu_linear(layer.down, with_lora(gate_up, x, lora, i, "gate_up"), keep)
            h = h + with_lora(down, act, lora, i, "down")
        return rms_norm(h, self.norm, c.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
