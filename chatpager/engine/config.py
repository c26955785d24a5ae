"""Model and engine configuration: validated once, read everywhere."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatpager.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(slots=True)
class ModelConfig:
    """The few numbers our Llama-family forward needs, read from a Hugging Face config."""

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
    hf_config: object  # the transformers PretrainedConfig, for RoPE variants

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {model_type!r}: chatpager runs Llama-family models "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported activation {hf.hidden_act!r} (only silu / SwiGLU)")
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            hf_config=hf,
        )

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when every layer has it (Mistral; Qwen2 windowing all its layers), else None.
        Qwen2's `max_window_layers` leaves its first layers full: such mixed models are not windowed
        here (they run full attention, capped at the window)."""
        types = getattr(self.hf_config, "layer_types", None) or ()
        if not self.sliding_window or any(t != "sliding_attention" for t in types):
            return None
        return self.sliding_window

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


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
