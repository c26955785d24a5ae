"""Model and engine configuration: validated once, read everywhere.

`ModelConfig` is read from a checkpoint's config.json without transformers (importing its config
classes costs seconds at start-up). Keys a config.json may leave out take the defaults of
transformers' config class for that model type (`_DEFAULTS`), so a config reads the same here
as through `AutoConfig` (tests/engine/model/test_model_config.py checks both on minimal files); the sizes
that define the network must be present.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chatpager.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
               head_dim=None, num_key_value_heads=None, sliding_window=None, rope_theta=10000.0,
               bos_token_id=None, eos_token_id=None)
_QWEN = dict(max_position_embeddings=32768, num_key_value_heads=32, use_sliding_window=False,
             sliding_window=4096, max_window_layers=28)
_DEFAULTS: dict[str, dict[str, Any]] = {  # transformers 5's LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, sliding_window=4096,
                    bos_token_id=1, eos_token_id=2),
    "qwen2": _QWEN,
    "qwen3": dict(_QWEN, head_dim=128),
}


@dataclass(slots=True)
class ModelConfig:
    """The few numbers our Llama-family forward needs, read from a Hugging Face config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    layer_types: tuple[str, ...]  # "full_attention" / "sliding_attention" per layer; () when not given
    rope_parameters: dict[str, Any]  # always has "rope_type" and "rope_theta"
    eos_token_id: int | list[int] | None
    raw: dict[str, Any]  # config.json as read, for what only transformers computes (scaled RoPE)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Validate config.json's contents (a dict) and fill in the model type's defaults."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {model_type!r}: chatpager runs Llama-family models "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        missing = [k for k in _REQUIRED if raw.get(k) is None]
        if missing:
            raise ModelLoadError(f"config.json lacks {', '.join(missing)}")
        c = {**_COMMON, **_DEFAULTS[model_type], **raw}
        if c["hidden_act"] != "silu":
            raise ModelLoadError(f"unsupported activation {c['hidden_act']!r} (only silu / SwiGLU)")
        heads = c["num_attention_heads"]
        # Qwen's flag switches the window off; other types have no flag (transformers: attribute absent)
        window = c["sliding_window"] if c.get("use_sliding_window", True) else None
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c["num_key_value_heads"] or heads,
            head_dim=c["head_dim"] or c["hidden_size"] // heads,
            rms_norm_eps=c["rms_norm_eps"],
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            qkv_bias=model_type == "qwen2" or bool(c["attention_bias"]),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            layer_types=tuple(c.get("layer_types") or _qwen_layer_types(c, window)),
            rope_parameters=_rope_parameters(c),
            eos_token_id=c["eos_token_id"],
            raw=raw,
        )

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when every layer has it (Mistral; Qwen2 windowing all its layers), else None.
        Qwen2's `max_window_layers` leaves its first layers full: such mixed models are not windowed
        here (they run full attention, capped at the window)."""
        if not self.sliding_window or any(t != "sliding_attention" for t in self.layer_types):
            return None
        return self.sliding_window

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def _qwen_layer_types(c: dict[str, Any], window: int | None) -> list[str]:
    """Qwen2/3 window only the layers from `max_window_layers` on (transformers derives the list
    the same way when config.json has none); other types give no list."""
    if c["model_type"] not in ("qwen2", "qwen3"):
        return []
    return ["sliding_attention" if window is not None and i >= c["max_window_layers"] else "full_attention"
            for i in range(c["num_hidden_layers"])]


def _rope_parameters(c: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers 5's form: older files keep `rope_theta` and `rope_scaling`
    at the top level, newer ones one `rope_parameters` dict."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    params.setdefault("rope_theta", c["rope_theta"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):  # the pre-training context, as transformers fills it
        if "original_max_position_embeddings" in c:
            params["original_max_position_embeddings"] = c["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    return params


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes; None: 256 MiB on CPU, 85% of free memory on CUDA
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's own limit
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # token budget per step; None: 512 on CPU, 8192 on CUDA
    preemption_mode: str = "recompute"  # or "swap"

    def __post_init__(self) -> None:
        bs = self.block_size
        if not (1 <= bs <= 128 and bs & (bs - 1) == 0):
            raise ValueError(f"block_size must be a power of two from 1 to 128, got {bs}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
