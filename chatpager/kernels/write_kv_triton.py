"""Triton KV write: store each new token's K/V at its slot in the paged cache.

Same contract as `write_kv_torch`: k, v [num_tokens, num_kv_heads, head_dim];
k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping [num_tokens]
with slot = block_id * block_size + offset, or -1 to skip the token. Values are cast to the
cache dtype. One program per token copies all of its KV heads at once.

A quantized cache (int8 / float8_e4m3fn codes, given with `k_scale` / `v_scale`
[num_blocks, block_size, num_kv_heads, 2]) stores codes and a (scale, offset) per (token, head)
with the formulas and rounding of `kv_quant_torch.quantize`, so both backends write the same
bytes (on a GPU up to Triton's approximate fp32 division, rarely one code apart).
"""
from __future__ import annotations

import torch

from chatpager.kernels.kv_quant_torch import MIN_SCALE, QMAX, check_scales, code_view, kv_quant_code
from chatpager.kernels.triton_env import import_triton, interpreting

triton = import_triton()
import triton.language as tl  # noqa: E402  (triton must come from import_triton first)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KV_QUANT: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)

    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims
    if KV_QUANT == 0:
        tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        # (scale, offset) pairs share the codes' layout with 2 for head_dim: [blocks, block_size, kv_heads, 2]
        scale_at = ((block * BLOCK_SIZE + offset) * NUM_KV_HEADS + tl.arange(0, HEADS_PAD)) * 2
        head_ok = tl.arange(0, HEADS_PAD) < NUM_KV_HEADS
        _store_quantized(k.to(tl.float32), k_dst, k_scale_ptr + scale_at, mask, head_ok, KV_QUANT, QMAX, MIN_SCALE)
        _store_quantized(v.to(tl.float32), v_dst, v_scale_ptr + scale_at, mask, head_ok, KV_QUANT, QMAX, MIN_SCALE)


@triton.jit
def _store_quantized(x, dst, scale_dst, mask, head_ok, KV_QUANT: tl.constexpr, QMAX: tl.constexpr,
                     MIN_SCALE: tl.constexpr):
    """x [heads, dims] as codes with a (scale, offset) per head (KV_QUANT 1: int8 codes -128..127
    over [min, max]; 2: fp8 codes -448..448 over +-max |x|, offset 0, stored as bytes)."""
    hi = tl.max(tl.where(mask, x, float("-inf")), 1)
    lo = tl.min(tl.where(mask, x, float("inf")), 1)
    if KV_QUANT == 1:
        scale = tl.maximum((hi - lo) / 255, MIN_SCALE)
        zero = lo + 128 * scale
        y = tl.minimum(tl.maximum((x - zero[:, None]) / scale[:, None], -QMAX - 1), QMAX)
    else:
        scale = tl.maximum(tl.maximum(hi, -lo) / 448, MIN_SCALE)
        zero = scale * 0.0
        y = tl.minimum(tl.maximum((x - zero[:, None]) / scale[:, None], -QMAX), QMAX)
    if KV_QUANT == 1:
        codes = tl.floor(y + 0.5).to(tl.int8)
    else:
        # Round to e4m3's grid first (kv_quant_torch's rule): step 2^(e - 3) from y's exponent
        # bits, built as float bits so it is exact; the conversion after it then rounds nothing.
        e = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        step = ((e + 124) << 23).to(tl.float32, bitcast=True)
        inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)
        # fp8 codes travel as their bytes (the cache is passed as a uint8 view)
        codes = (tl.floor(y * inv_step + 0.5) * step).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(dst, codes, mask=mask)
    tl.store(scale_dst, scale, mask=head_ok)
    tl.store(scale_dst + 1, zero, mask=head_ok)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"need k, v [tokens, kv_heads, dim] and two caches [blocks, block_size, kv_heads, dim]; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} != k's {(num_kv_heads, head_dim)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [num_tokens={num_tokens}], got {tuple(slot_mapping.shape)}")
    if k_cache.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {k_cache.device}) unless TRITON_INTERPRET=1")
    quant = kv_quant_code(k_cache.dtype)
    check_scales(k_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    _write_kv_kernel[(num_tokens,)](
        k, v, code_view(k_cache), code_view(v_cache), slot_mapping.contiguous(),
        k_scale if quant else k, v_scale if quant else v,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], KV_QUANT=quant, QMAX=QMAX.get(k_cache.dtype, 1.0), MIN_SCALE=MIN_SCALE,
    )

