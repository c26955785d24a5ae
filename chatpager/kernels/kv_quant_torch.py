"""Quantized KV cache on the torch path: quantize on write, dequantize the step's blocks on read.

Storage: the cache holds codes (int8, or float8_e4m3fn) of shape [num_blocks, block_size,
num_kv_heads, head_dim] and a float32 scale per (slot, KV head), [num_blocks, block_size,
num_kv_heads]; a value is code * scale. The scale of one token's head is amax / QMAX over its
head_dim values (127 for int8, 448 for fp8 e4m3), so the largest value maps to the largest code.

Why per token and head (not per block, not per layer): a block fills over many steps, so a
block-wide scale would either clip the tokens that arrive later or force re-quantizing the
ones already there; a per-layer scale needs calibration data we do not have. Per-token scales
make every write independent of every other (no read-modify-write, so chunked prefill, CoW
copies and the Triton write kernel stay as simple as with floats) and track outlier tokens.
The cost is 4 bytes per (token, head) beside head_dim bytes of codes: 6 % at head_dim 64.

Rounding (shared with the Triton kernels, so both write the same bytes): y = x / s clamped to
+-QMAX, then rounded half up to a multiple of the format's step: 1 for int8; for e4m3 the
spacing of its grid around y, 2^(e - 3) with e = max(floor(log2 |y|), -6) (3 mantissa bits;
below 2^-6 the subnormals' fixed spacing). The rounded value lies on the fp8 grid, so the
dtype conversion after it is exact; that also sidesteps Triton's interpreter, whose own fp32 ->
fp8 conversion loses the carry into the next binade (126.8 became 64).

Attention: `plan_quant_attention` lists the physical blocks a step reads (each once, shared
prefixes included) and renumbers the block tables into that list; per layer those blocks are
dequantized into a small float cache and `paged_attention_torch` (the contract's reference)
runs on it unchanged. The extra cost is one gather of the step's blocks per layer, about what
the reference's own gather costs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatpager.kernels.paged_attention_torch import TorchAttentionPlan, paged_attention_torch, plan_paged_attention

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # largest code of each storage dtype
MIN_SCALE = 1e-12  # an all-zero head gets codes 0 with this scale, not a division by zero


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def kv_quant_code(dtype: torch.dtype) -> int:
    """The kernels' KV_QUANT constant: 0 floats, 1 int8 codes, 2 fp8 codes."""
    return 0 if not is_quantized(dtype) else (1 if dtype == torch.int8 else 2)


def code_view(cache: torch.Tensor) -> torch.Tensor:
    """fp8 caches go to the Triton kernels as bytes (bitcast there): one path for GPU and interpreter."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes [..., head_dim] of `dtype`, float32 scales [...])."""
    qmax = QMAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(-1) / qmax).clamp_min(MIN_SCALE)
    y = (xf / scale.unsqueeze(-1)).clamp(-qmax, qmax)
    if dtype == torch.int8:
        return torch.floor(y + 0.5).to(dtype), scale
    step = torch.ldexp(torch.ones_like(y), (torch.frexp(y).exponent - 1).clamp_min(-6) - 3)  # exact powers of 2
    return (torch.floor(y / step + 0.5) * step).to(dtype), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """index_copy_ has no float8 kernel on CPU: copy fp8 codes as their bytes."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def write_kv_quant_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """`write_kv_torch`'s contract, storing codes and their scales; a slot of -1 is skipped."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        codes, s = quantize(x, cache.dtype)
        _byte_view(cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slots, _byte_view(codes))
        scales.view(-1, num_kv_heads).index_copy_(0, slots, s)


@dataclass(slots=True)
class QuantAttentionPlan:
    blocks: torch.Tensor  # long [U]: the physical blocks this step reads, each once
    block_tables: torch.Tensor  # int32 [num_seqs, width]: the tables renumbered into `blocks`
    inner: TorchAttentionPlan  # the reference's plan over the renumbered tables


def plan_quant_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         block_size: int, sliding_window: int | None = None) -> QuantAttentionPlan:
    entry = torch.arange(block_tables.shape[1], device=block_tables.device)
    seq_lens = seq_lens.long()
    live = entry < (seq_lens + block_size - 1).div(block_size, rounding_mode="floor").unsqueeze(1)  # not padding
    if sliding_window:  # nor wholly before the window of the row's first query (maybe a freed entry)
        first_query = seq_lens - query_start_loc.diff().long()
        live &= entry >= (first_query - sliding_window + 1).clamp_min(0).div(block_size, rounding_mode="floor")[:, None]
    blocks = torch.unique(block_tables[live].long())  # sorted
    compact = torch.searchsorted(blocks, block_tables.long()).clamp_max(blocks.numel() - 1)
    compact = torch.where(live, compact, 0).to(torch.int32)
    return QuantAttentionPlan(blocks, compact, plan_paged_attention(compact, seq_lens, query_start_loc, block_size,
                                                                    sliding_window))


def paged_attention_quant_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, out: torch.Tensor | None = None,
                                plan: QuantAttentionPlan | None = None, k_scale: torch.Tensor | None = None,
                                v_scale: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """`paged_attention_torch`'s contract over a quantized cache (codes + scales)."""
    if k_scale is None or v_scale is None:
        raise ValueError("a quantized KV cache needs k_scale and v_scale")
    if plan is None:
        plan = plan_quant_attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1], sliding_window)
    k = dequantize(k_cache.index_select(0, plan.blocks), k_scale.index_select(0, plan.blocks), q.dtype)
    v = dequantize(v_cache.index_select(0, plan.blocks), v_scale.index_select(0, plan.blocks), q.dtype)
    return paged_attention_torch(q, k, v, plan.block_tables, seq_lens, query_start_loc, scale, out=out,
                                 plan=plan.inner)
