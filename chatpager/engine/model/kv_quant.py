"""KV cache formats: what `kv_cache_dtype` means and what one block costs.

    "auto"      the model's dtype (float32 on CPU, bfloat16 on CUDA by default)
    "float32" / "bfloat16" / "float16"   plain floats of that dtype
    "int8"      int8 codes + a float32 (scale, offset) per (token, KV head)
    "fp8"       float8_e4m3fn codes + a float32 (scale, offset) per (token, KV head)

The codes, the scale granularity, the rounding and int8's rotated basis are defined in
`chatpager.kernels.kv_quant_torch` (per token and head, and why). A format's bytes per token
include the scales, so the pool derived from `kv_cache_memory` holds proportionally more
blocks: 256 / 72 = 3.6x an fp32 cache's for head_dim 64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatpager.engine.config import ModelConfig
from chatpager.kernels.kv_quant_torch import is_quantized

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "int8")
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "fp8": torch.float8_e4m3fn, "int8": torch.int8}
SCALE_BYTES = 8  # a float32 (scale, offset) per (token, KV head)


@dataclass(frozen=True, slots=True)
class KVFormat:
    name: str  # "float32", "bfloat16", "float16", "fp8" or "int8" (never "auto")
    storage: torch.dtype

    @property
    def quantized(self) -> bool:
        return is_quantized(self.storage)

    def bytes_per_token(self, cfg: ModelConfig) -> int:
        """K and V of one token in every layer, scales included."""
        per_head = cfg.head_dim * torch.empty((), dtype=self.storage).element_size()
        per_head += SCALE_BYTES if self.quantized else 0
        return 2 * cfg.num_layers * cfg.num_kv_heads * per_head


def resolve_kv_format(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> KVFormat:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        name = str(model_dtype).removeprefix("torch.")
        return KVFormat(name, model_dtype)
    if kv_cache_dtype == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("kv_cache_dtype='fp8' needs a GPU with fp8 support (compute capability 8.9+); use 'int8'")
    return KVFormat(kv_cache_dtype, _STORAGE[kv_cache_dtype])
