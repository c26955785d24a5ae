"""Quantized KV cache on the torch path: quantize on write, dequantize the step's blocks on read.

Storage: the cache holds codes (int8, or float8_e4m3fn) of shape [num_blocks, block_size,
num_kv_heads, head_dim] and, per (slot, KV head), a float32 pair (scale s, offset z) of shape
[num_blocks, block_size, num_kv_heads, 2]; a value is code * s + z. For int8 the pair maps the
range [min, max] of one token's head onto -128..127 (s = (max - min) / 255, z = min + 128 s);
fp8 keeps z = 0 and s = max |x| / 448, so its relative precision stays with each value.

Why per token and head (not per block, not per layer): a block fills over many steps, so a
block-wide scale would either clip the tokens that arrive later or force re-quantizing the
ones already there; a per-layer scale needs calibration data we do not have. Per-token pairs
make every write independent of every other (no read-modify-write, so chunked prefill, CoW
copies and the Triton write kernel stay as simple as with floats) and track outlier tokens.
Why an offset for int8 only: a token's K values sit off-centre. Measured on SmolLM2-135M,
teacher-forced next-token agreement with the fp32 cache over chatpager/bench/quality_text.txt
(2,335 tokens), before the rotation below: int8 symmetric 98.7 %, with the offset 99.0 %; fp8
symmetric 96.4 %, centred 94.1 % (centring moves values near zero away from fp8's fine steps);
a bf16 cache 99.6 %. In the rotated basis the offset still lowers the KL to the fp32 cache
(1.4e-4 vs 1.7e-4 symmetric). fp8 maps max |x| to 448 and rounds to nearest (ties up; torch's
ties-to-even cast gives 96.45 %): its scale is not what limits it, its 3 mantissa bits are.
The cost is 8 bytes per (token, head) beside head_dim bytes of codes (fp8 stores its zero
offset too, one layout for both): 72 vs 256 bytes at head_dim 64, 3.6x fewer.

Rounding (shared with the Triton kernels, so both write the same bytes): y = (x - z) / s
clamped to the code range, then rounded half up to a multiple of the format's step: 1 for
int8; for e4m3 the spacing of its grid around y, 2^(e - 3) with e = max(floor(log2 |y|), -6)
(3 mantissa bits; below 2^-6 the subnormals' fixed spacing). The rounded value lies on the fp8
grid, so the dtype conversion after it is exact; that also sidesteps Triton's interpreter,
whose own fp32 -> fp8 conversion loses the carry into the next binade (126.8 became 64).

Basis (int8): K and V are quantized after an orthogonal rotation R (`kv_rotation`: normalized
Hadamard blocks, symmetric, so R R = I). SmolLM2-135M's K has outlier channels (the slow RoPE
pairs, up to 6x a token's RMS) that set each token's range and so every other channel's step;
in the rotated basis every channel carries a share of them and the range shrinks about 2x (crest
factor ~5 -> ~2.4, what 64 Gaussian values have). q . k = (q R) . (k R), and attention over
rotated values returns the rotated output, rotated back once: out = (sum_j p_j v_j R) R. The
backend (`chatpager.engine.model.attention`) rotates q, k, v before the kernels and the output after,
so both backends share it and the kernels' contract stays "codes of the vectors given".
Measured on SmolLM2-135M (`python -m chatpager.bench.quality --kv-cache-dtype int8`): K's
relative RMS error 0.77 % -> 0.50 %; teacher-forced agreement 99.01 % -> 99.27 %, perplexity
+0.18 % -> +0.01 %; greedy 32-token replies equal to the fp32 cache's for 25 -> 29 of 42 chat
prompts (a bf16 cache, 0.16 % error: 35). Rotating K alone gave 99.19 %. Two (scale, offset)
pairs per head on top (8 more bytes per head) gave 99.49 %, but the KL to the fp32 cache only
1.4e-4 -> 1.2e-4: the codes are near their floor. fp8 is not rotated: its error is
relative to each value (3 mantissa bits), which a rotation does not change (96.40 % -> 96.23 %,
KL 3.9e-3 -> 3.7e-3), so it would cost the matmuls for nothing.

Attention: `plan_quant_attention` lists the physical blocks a step reads (each once, shared
prefixes included) and renumbers the block tables into that list; per layer those blocks are
dequantized into a small float cache and `paged_attention_torch` (the contract's reference), or
on the CPU backend `paged_attention_cpu`, runs on it unchanged. The extra cost is one gather of
the step's blocks per layer, about what the reference's own gather costs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from chatpager.kernels.paged_attention_cpu import CpuAttentionPlan, paged_attention_cpu, plan_cpu_attention
from chatpager.kernels.paged_attention_torch import paged_attention_torch, plan_paged_attention, TorchAttentionPlan

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # largest code of each storage dtype
MIN_SCALE = 1e-12  # a constant head (max == min) gets this scale, not a division by zero


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def is_rotated(dtype: torch.dtype) -> bool:
    """Whether a cache of this storage dtype holds K/V in the `kv_rotation` basis (int8 only)."""
    return dtype == torch.int8


@functools.lru_cache(maxsize=16)
def kv_rotation(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[head_dim, head_dim] orthogonal and symmetric (x R R = x): normalized Sylvester-Hadamard
    blocks on the diagonal, each of the largest power of two dividing head_dim (all of it for
    64 or 128; identity for an odd head_dim)."""
    n = head_dim & -head_dim  # largest power of two dividing head_dim
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    r = torch.block_diag(*[h / n ** 0.5] * (head_dim // n))
    return r.to(dtype=dtype, device=device)


def kv_quant_code(dtype: torch.dtype) -> int:
    """The kernels' KV_QUANT constant: 0 floats, 1 int8 codes, 2 fp8 codes."""
    return 0 if not is_quantized(dtype) else (1 if dtype == torch.int8 else 2)


def code_view(cache: torch.Tensor) -> torch.Tensor:
    """fp8 caches go to the Triton kernels as bytes (bitcast there): one path for GPU and interpreter."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def check_scales(cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """What the Triton kernels assume of a quantized cache's (scale, offset) tensors."""
    if not is_quantized(cache.dtype):
        return
    want = (*cache.shape[:3], 2)
    for t in (k_scale, v_scale):
        if t is None or t.shape != want or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"a quantized cache needs contiguous float32 k_scale / v_scale of shape {want}")


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes [..., head_dim] of `dtype`, float32 (scale, offset) [..., 2])."""
    xf = x.float()
    hi, lo = xf.amax(-1), xf.amin(-1)
    if dtype == torch.int8:
        scale = ((hi - lo) / 255).clamp_min(MIN_SCALE)
        offset = lo + 128 * scale
    else:
        scale = (torch.maximum(hi, -lo) / 448).clamp_min(MIN_SCALE)
        offset = torch.zeros_like(scale)
    qmax = QMAX[dtype]
    y = ((xf - offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(-qmax - (dtype == torch.int8), qmax)
    if dtype == torch.int8:
        codes = torch.floor(y + 0.5).to(dtype)
    else:
        step = torch.ldexp(torch.ones_like(y), (torch.frexp(y).exponent - 1).clamp_min(-6) - 3)  # exact powers of 2
        codes = (torch.floor(y / step + 0.5) * step).to(dtype)
    return codes, torch.stack([scale, offset], -1)


def dequantize(codes: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., head_dim] and their (scale, offset) [..., 2] -> values of `dtype`."""
    return (codes.float() * meta[..., :1] + meta[..., 1:]).to(dtype)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """index_copy_ has no float8 kernel on CPU: copy fp8 codes as their bytes."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def write_kv_quant_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """`write_kv_torch`'s contract, storing codes and their (scale, offset) pairs in k_scale /
    v_scale [num_blocks, block_size, num_kv_heads, 2]; a slot of -1 is skipped."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        codes, meta = quantize(x, cache.dtype)
        _byte_view(cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slots, _byte_view(codes))
        scales.view(-1, num_kv_heads, 2).index_copy_(0, slots, meta)


@dataclass(slots=True)
class QuantAttentionPlan:
    blocks: torch.Tensor  # long [U]: the physical blocks this step reads, each once
    block_tables: torch.Tensor  # int32 [num_seqs, width]: the tables renumbered into `blocks`
    inner: TorchAttentionPlan | CpuAttentionPlan  # the float path's plan over the renumbered tables


def plan_quant_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         block_size: int, sliding_window: int | None = None,
                         kernel: bool = False) -> QuantAttentionPlan:
    """`kernel`: the dequantized blocks are read by `paged_attention_cpu` (the C kernel), not the reference."""
    entry = torch.arange(block_tables.shape[1], device=block_tables.device)
    seq_lens = seq_lens.long()
    live = entry < (seq_lens + block_size - 1).div(block_size, rounding_mode="floor").unsqueeze(1)  # not padding
    if sliding_window:  # nor wholly before the window of the row's first query (maybe a freed entry)
        first_query = seq_lens - query_start_loc.diff().long()
        live &= entry >= (first_query - sliding_window + 1).clamp_min(0).div(block_size, rounding_mode="floor")[:, None]
    blocks = torch.unique(block_tables[live].long())  # sorted
    compact = torch.searchsorted(blocks, block_tables.long()).clamp_max(blocks.numel() - 1)
    compact = torch.where(live, compact, 0).to(torch.int32)
    planner = plan_cpu_attention if kernel else plan_paged_attention
    return QuantAttentionPlan(blocks, compact, planner(compact, seq_lens, query_start_loc, block_size, sliding_window))


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
    attend = paged_attention_cpu if isinstance(plan.inner, CpuAttentionPlan) else paged_attention_torch
    return attend(q, k, v, plan.block_tables, seq_lens, query_start_loc, scale, out=out, plan=plan.inner)
