"""Decode attention on AVX512 CPUs, straight through the block table: `cpu_attention.cpp`.

`decode_attention(q, k_cache, v_cache, block_tables, rows, scale, out)` computes, for each row
(token, sequence, length, first visible key) of `rows`, that token's attention (one query, all
heads) over keys first..length-1 of the sequence, in float32 with an online softmax, and writes
it into `out` (and the log-sum-exp of each head's scores into `lse` when given). K/V are read in
place from the paged cache (float32, bfloat16 or float16): nothing is gathered, and table entries
before the block of the first visible key are never read (a sliding window's freed entries).

One call does a whole step's decode rows: work items are (row, kv head), each reading its keys
and values once for its GQA group of query heads, spread over torch's OpenMP threads only when
the call is long enough to pay for waking them. Built and loaded by `cpu_build`;
CHATPAGER_CPU_ATTENTION=0 disables it (the torch reference runs instead). `write_kv` stores a
step's new K/V into their slots (`write_kv_torch`'s contract) in one call, for K/V already in the
cache's dtype.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from chatpager.kernels import cpu_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
MAX_HEAD_DIM = 256
_CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load(SOURCE, cpu_build.AVX512_FLAGS, cpu_build.AVX512_CPU_FLAGS, "CHATPAGER_CPU_ATTENTION",
                         "torch's attention", log)
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.cpu_attention_decode.argtypes = [p, p, p, i64, i64, p, p, ctypes.c_int, i64, i64, p, i64, p, i64,
                                         ctypes.c_float]
    lib.cpu_attention_decode.restype = ctypes.c_int
    lib.cpu_attention_write_kv.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.cpu_attention_write_kv.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel runs here (built, or loaded from the cache, on first call)."""
    return _library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes this query and cache (besides `available()`)."""
    return (q.device.type == "cpu" and q.dtype is torch.float32 and k_cache.dtype in _CACHE_TYPES
            and q.shape[-1] <= MAX_HEAD_DIM and q.shape[1] % k_cache.shape[2] == 0)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     rows: torch.Tensor, scale: float, out: torch.Tensor, lse: torch.Tensor | None = None) -> None:
    """q, out float32 [num_tokens, num_heads, head_dim]; caches [num_blocks, block_size, kv_heads,
    head_dim]; block_tables int32 [num_seqs, width]; rows int32 [R, 4]; lse float32 [num_tokens,
    num_heads] or None. All contiguous (checked: the kernel reads raw pointers)."""
    if not supports(q, k_cache) or out.dtype is not torch.float32 or v_cache.dtype is not k_cache.dtype:
        raise ValueError("decode_attention takes a float32 query and output and a float cache")
    if rows.dtype is not torch.int32 or block_tables.dtype is not torch.int32:
        raise ValueError("rows and block_tables must be int32")
    tensors = (q, out, k_cache, v_cache, block_tables, rows) + (() if lse is None else (lse,))
    if not all(t.is_contiguous() for t in tensors) or k_cache.shape != v_cache.shape or q.shape != out.shape:
        raise ValueError("decode_attention needs contiguous tensors, q and out alike, k and v caches alike")
    _, block_size, kv_heads, head_dim = k_cache.shape
    cpu_build.call("cpu_attention::decode", _library().cpu_attention_decode, q.data_ptr(), out.data_ptr(),
                   None if lse is None else lse.data_ptr(), q.shape[1], head_dim, k_cache.data_ptr(),
                   v_cache.data_ptr(), _CACHE_TYPES[k_cache.dtype], block_size, kv_heads, block_tables.data_ptr(),
                   block_tables.shape[1], rows.data_ptr(), rows.shape[0], scale)


def can_write_kv(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Whether `write_kv` takes these (besides `available()`): K/V already in the cache's dtype."""
    return (k.device.type == "cpu" and k.dtype is k_cache.dtype and slot_mapping.dtype is torch.int64
            and k_cache.is_contiguous())


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [num_tokens, kv_heads, head_dim] into the caches' rows `slot_mapping` (int64; -1: skip)."""
    if not (can_write_kv(k, k_cache, slot_mapping) and v.dtype is k.dtype and v_cache.dtype is k_cache.dtype
            and v_cache.is_contiguous() and k.shape == v.shape and k.shape[1:] == k_cache.shape[2:]
            and k_cache.shape == v_cache.shape and slot_mapping.shape == k.shape[:1]):
        raise ValueError("write_kv takes K/V of the caches' dtype and row shape and an int64 slot per token")
    k, v, slots = k.contiguous(), v.contiguous(), slot_mapping.contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if cpu_build.call("cpu_attention::write_kv", _library().cpu_attention_write_kv, k.data_ptr(), v.data_ptr(),
                      k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), k.shape[0],
                      k[0].numel() * k.element_size() if k.shape[0] else 0, num_slots):
        raise IndexError(f"a slot is out of range (the caches hold {num_slots})")
