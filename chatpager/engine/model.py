"""Llama-family decoder over packed tokens (no padding), reading K/V only through the backend.

Covers the llama, mistral, qwen2 (qkv bias) and qwen3 (per-head q/k RMSNorm) layouts: RMSNorm,
RoPE (scaled variants included), grouped-query attention, SwiGLU MLP, tied or untied embeddings.
q/k/v and gate/up projections are fused into one matmul each at load time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatpager.engine.attention import AttentionBackend, AttentionMetadata
from chatpager.engine.config import ModelConfig
from chatpager.engine.kv_cache import KVCache
from chatpager.engine.rope import apply_rope, rope_tables
from chatpager.errors import ModelLoadError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass(slots=True)
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class Model:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, max_positions: int) -> None:
        self.config = config
        self.scale = config.head_dim ** -0.5

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"checkpoint lacks tensor {name!r}")
            return weights[name].to(device=device, dtype=dtype)

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        tied = config.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = self.embed if tied else take("lm_head.weight")
        self.layers: list[Layer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            biases = [maybe(a + f"{n}_proj.bias") for n in "qkv"]
            self.layers.append(Layer(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]),
                qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                q_norm=maybe(a + "q_norm.weight") if config.qk_norm else None,
                k_norm=maybe(a + "k_norm.weight") if config.qk_norm else None,
                o=take(a + "o_proj.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                down=take(p + "mlp.down_proj.weight"),
            ))
        cos, sin = rope_tables(config.hf_config, config.head_dim, max_positions)
        self.cos, self.sin = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, attention: AttentionBackend) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        c = self.config
        n = input_ids.shape[0]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos, sin = self.cos[positions], self.sin[positions]
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            q, k, v = F.linear(x, layer.qkv, layer.qkv_bias).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(n, c.num_heads, c.head_dim)
            k = k.view(n, c.num_kv_heads, c.head_dim)
            v = v.view(n, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, c.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, c.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache, v_cache = kv_cache.layer(i)
            o = attention(q, k, v, k_cache, v_cache, meta, self.scale)
            h = h + F.linear(o.reshape(n, q_size), layer.o)
            x = rms_norm(h, layer.post_norm, c.rms_norm_eps)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.down)
        return rms_norm(h, self.norm, c.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
