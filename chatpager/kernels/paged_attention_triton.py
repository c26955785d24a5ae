"""Triton paged attention: one kernel for mixed batches of decodes and prefill chunks.

Contract (the same as `paged_attention_torch`, which defines the meaning):
    q               [num_tokens, num_heads, head_dim]   new tokens of all sequences, packed in order
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables    int32 [num_seqs, max_blocks]         padding entries are never read
    seq_lens        int32 [num_seqs]                     context length *after* this step's tokens
    query_start_loc int32 [num_seqs + 1]                 offsets of each sequence's queries in q
The queries of sequence i are the last q_len_i positions of its context and attend causally
to the whole context through the block table. The output has q's shape and dtype.

Supported: any GQA ratio (num_heads a multiple of num_kv_heads), any head_dim (padded to a
power of two >= 16 with masks), any block_size >= 1, fp32/fp16/bf16 (q and cache may differ;
K/V are cast to q's dtype for the dot products). Softmax statistics and accumulation are fp32.
A quantized cache (int8 / float8_e4m3fn codes with `k_scale` / `v_scale` [num_blocks,
block_size, num_kv_heads, 2] holding (scale s, offset z), see `kv_quant_torch`) is dequantized
in the kernel without expanding K or V: codes are exact in the dot dtype, and
q . (c s + z) = s (q . c) + z sum(q) per key column, sum_j p_j (c_j s_j + z_j) =
(p * s) @ c + p @ z per value, which equals attention over the dequantized K and V.

How the work is cut:
- A program owns BLOCK_Q query tokens of one sequence times the GROUP query heads that share
  one KV head: BLOCK_M = BLOCK_Q * GROUP_PAD rows. K/V are therefore read once per KV head,
  not once per query head.
- The key axis is walked in tiles of TILE_N positions. Each position finds its physical slot
  through the block table (block = table[pos // block_size]), so the tile size does not
  depend on the block size and block sizes from 1 to 128 all work.
- Programs are numbered without a host sync: sequence i's query blocks start at program
  query_start_loc[i] // BLOCK_Q + i, which leaves room for ceil(q_len_i / BLOCK_Q) blocks;
  each program finds its sequence by binary search and leftover programs exit at once.
- Split-KV (flash decoding): with num_splits > 1 each program also takes one contiguous share
  of its key tiles and writes an fp32 partial result with its softmax max and sum; a second
  kernel merges the shares. It pays off when there are too few (sequence, KV head) programs to
  fill the GPU and contexts are long, i.e. small decode batches.

Under TRITON_INTERPRET=1 (set by `import_triton` when there is no CUDA device) the kernels run
on CPU tensors, slowly but exactly; that is how the tests run without a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from chatpager.kernels.kv_quant_torch import check_scales, code_view, kv_quant_code
from chatpager.kernels.triton_env import import_triton, interpreting

triton = import_triton()
import triton.language as tl  # noqa: E402  (triton must come from import_triton first)

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_DTYPES = _DTYPES + (torch.int8, torch.float8_e4m3fn)


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """The last sequence whose first query-block program is <= pid (binary search)."""
    lo = pid * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid - 1)
    return lo


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    qk_scale, num_seqs, num_splits, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLIT_KV: tl.constexpr, SLIDING: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_QUANT: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
):
    # Which sequence, which of its query blocks, which KV head and which KV split.
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, pid, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - q_len  # context positions before this step's first query

    # Row r is query token r // GROUP_PAD and head r % GROUP_PAD of this KV head's group;
    # the rows of padded heads (GROUP_PAD > GROUP) and past the last token are masked.
    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = cached + tok  # each row's position in the context: it sees keys 0..q_pos
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM

    # Stage 1: load the q tile [BLOCK_M, HEAD_DIM_PAD].
    q_offs = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)
    if KV_QUANT != 0:
        q_sum = tl.sum(q.to(tl.float32), 1)  # meets the keys' offsets

    # Keys up to this block's last query; with SPLIT_KV this program takes one share of them.
    kv_end = cached + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
    # With a sliding window the block's first query sees keys from kv_start on; earlier tiles
    # are skipped and earlier positions never read (their blocks may be freed: null entries).
    kv_start = tl.maximum(cached + q_block * BLOCK_Q - window + 1, 0) if SLIDING else 0
    first_tile = kv_start // TILE_N
    num_tiles = tl.cdiv(kv_end, TILE_N) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)

    # Running max of scores (log2 units). It starts finite, not -inf, so that exp2(m_i - m_new)
    # is never exp2(-inf - -inf) = NaN for a row that has seen no visible key yet (a KV split).
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for tile in range(tile_lo, tile_hi):
        # Stage 2: find each key position's slot through the block table, load K^T and V.
        pos = tile * TILE_N + tl.arange(0, TILE_N)
        pos_ok = (pos < kv_end) & (pos >= kv_start)
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        offset = pos % BLOCK_SIZE
        k_offs = block[None, :] * stride_kb + offset[None, :] * stride_ks + kv_head * stride_kh + dims[:, None]
        k = tl.load(k_cache_ptr + k_offs, mask=dim_ok[:, None] & pos_ok[None, :], other=0.0)
        v_offs = block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh + dims[None, :]
        v = tl.load(v_cache_ptr + v_offs, mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
        if KV_QUANT == 2:  # fp8 codes arrive as bytes
            k = k.to(tl.float8e4nv, bitcast=True)
            v = v.to(tl.float8e4nv, bitcast=True)

        # Stage 3: scores in log2 units, causal and length masks.
        s = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        if KV_QUANT != 0:  # column j of the scores: s_j (q . codes_j) + z_j sum(q)
            scale_at = ((block * BLOCK_SIZE + offset) * NUM_KV_HEADS + kv_head) * 2
            k_s = tl.load(k_scale_ptr + scale_at, mask=pos_ok, other=0.0)
            k_z = tl.load(k_scale_ptr + scale_at + 1, mask=pos_ok, other=0.0)
            s = s * k_s[None, :] + q_sum[:, None] * k_z[None, :]
            v_s = tl.load(v_scale_ptr + scale_at, mask=pos_ok, other=0.0)
            v_z = tl.load(v_scale_ptr + scale_at + 1, mask=pos_ok, other=0.0)
        s = s * qk_scale
        visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING:  # each query sees its last `window` positions, itself included
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

        # Stage 4: online softmax: rescale what we have to the new max, add this tile.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_QUANT != 0:  # sum_j p_j (s_j codes_j + z_j)
            pv = tl.dot((p * v_s[None, :]).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            pv += tl.sum(p * v_z[None, :], 1)[:, None]
        else:
            pv = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # Stage 5: store. Masked rows may have l_i == 0; divide by 1 there instead of NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT_KV:
        # fp32 partial result per split, with the max and sum the merge kernel weights it by.
        part = ((q_start + tok) * (GROUP * tl.num_programs(1)) + head) * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=row_ok[:, None])
    else:
        o_offs = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    # One program per (token, query head): weight each split's partial output by its share
    # of the softmax denominator, sum_s l_s * 2^(m_s - M), and renormalise.
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    part = (token * tl.num_programs(1) + head) * num_splits + splits
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    weight = l * tl.exp2(m - tl.max(m, 0))
    dims = tl.arange(0, HEAD_DIM_PAD)
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], mask=split_ok[:, None], other=0.0)
    merged = tl.sum(weight[:, None] * o, 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, merged.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Tile sizes, grid and compile-time constants of one call; a function of shapes and
    dtypes only, so planning never syncs the GPU."""

    head_dim: int
    head_dim_pad: int  # head_dim rounded up to a power of two >= 16 (tl.dot needs >= 16)
    group: int  # query heads per KV head
    group_pad: int
    block_q: int  # query tokens per program
    block_m: int  # rows per program: block_q * group_pad
    tile_n: int  # key positions per inner-loop tile
    block_size: int
    dot_dtype: tl.dtype
    num_q_programs: int  # grid axis 0, an upper bound; surplus programs exit at once
    num_splits: int  # grid axis 2; > 1 means split-KV plus the merge kernel
    num_warps: int
    kv_quant: int  # 0: float cache; 1: int8 codes, 2: fp8 codes (`write_kv_triton.kv_quant_code`)
    num_kv_heads: int

    def constexprs(self) -> dict:
        """The attention kernel's tl.constexpr arguments."""
        return dict(
            HEAD_DIM=self.head_dim, HEAD_DIM_PAD=self.head_dim_pad, GROUP=self.group, GROUP_PAD=self.group_pad,
            BLOCK_Q=self.block_q, BLOCK_M=self.block_m, TILE_N=self.tile_n, BLOCK_SIZE=self.block_size,
            SPLIT_KV=self.num_splits > 1, DOT_DTYPE=self.dot_dtype,
            DOT_PRECISION="ieee" if self.dot_dtype == tl.float32 else "tf32",  # fp32 callers get fp32, not TF32
            KV_QUANT=self.kv_quant, NUM_KV_HEADS=self.num_kv_heads,
        )

    def merge_constexprs(self) -> dict:
        """The merge kernel's tl.constexpr arguments."""
        return dict(HEAD_DIM=self.head_dim, HEAD_DIM_PAD=self.head_dim_pad,
                    SPLITS_PAD=max(2, triton.next_power_of_2(self.num_splits)))


def plan_launch(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                num_splits: int | None = None) -> LaunchPlan:
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    # Decode rows are cheap (one query each): a 16-row tile, the smallest tl.dot takes;
    # prefill chunks get 64 rows so K/V tiles are reused across more queries.
    decode_only = num_tokens == num_seqs
    block_m = max(16 if decode_only else 64, group_pad)
    block_q = block_m // group_pad
    num_q_programs = num_tokens // block_q + num_seqs
    if num_splits is None:
        # The table width bounds the longest context without reading seq_lens on the host.
        max_context = block_tables.shape[1] * block_size
        num_splits = _choose_num_splits(num_q_programs * num_kv_heads, max_context, q.device) if decode_only else 1
    # Sized so that ptxas (sm_90) keeps every tile in registers without spilling: fp32 runs its
    # dots on FMA units ("ieee") and wide heads hold larger tiles, so both take 16-key tiles.
    tile_n = 16 if head_dim_pad > 128 or q.dtype == torch.float32 else 32
    return LaunchPlan(head_dim=head_dim, head_dim_pad=head_dim_pad, group=group, group_pad=group_pad,
                      block_q=block_q, block_m=block_m, tile_n=tile_n, block_size=block_size,
                      dot_dtype=_dot_dtype(q.dtype), num_q_programs=num_q_programs, num_splits=num_splits,
                      num_warps=4 if block_m <= 16 else 8, kv_quant=kv_quant_code(k_cache.dtype),
                      num_kv_heads=num_kv_heads)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Paged attention per the module contract; writes into `out` when given and returns it.

    sliding_window: each query attends only to the last `sliding_window` positions (itself
    included); block-table entries wholly before every query's window are never read.

    num_splits: None picks split-KV by a heuristic (decode-only batches with few programs and
    long contexts, on a GPU); 1 forces the single-pass kernel; n > 1 forces n KV splits.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, num_splits)
    quant = kv_quant_code(k_cache.dtype)
    check_scales(k_cache, k_scale, v_scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables, seq_lens, query_start_loc = (
        t.contiguous() for t in (block_tables, seq_lens, query_start_loc))
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    num_tokens, num_heads, _ = q.shape
    if num_tokens == 0:
        return out
    plan = plan_launch(q, k_cache, block_tables, num_splits)
    splits = plan.num_splits

    if splits > 1:
        part_out = torch.empty(num_tokens, num_heads, splits, plan.head_dim_pad, dtype=torch.float32, device=q.device)
        part_max = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # not touched: SPLIT_KV is off
    _paged_attention_kernel[(plan.num_q_programs, k_cache.shape[2], splits)](
        out, q, code_view(k_cache), code_view(v_cache), k_scale if quant else q, v_scale if quant else q,
        block_tables, seq_lens, query_start_loc,
        part_out, part_max, part_sum,
        scale * _LOG2E, seq_lens.numel(), splits, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        **plan.constexprs(), SLIDING=bool(sliding_window), num_warps=plan.num_warps,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_max, part_sum,
            splits, out.stride(0), out.stride(1),
            **plan.merge_constexprs(),
        )
    return out


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype of tl.dot operands: q's, except bf16 under the interpreter, whose tl.dot
    miscomputes bf16 operands (Triton 3.x); there fp32 operands give the exact answer."""
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _choose_num_splits(num_programs: int, max_context: int, device: torch.device) -> int:
    """Split the keys when the programs alone cannot fill the GPU and there are many keys.

    Each split should keep at least ~1k keys (fewer makes the merge cost dominate); aim for
    about two programs per SM. Under the interpreter programs run one by one, so never split.
    """
    if device.type != "cuda" or max_context < 2048:
        return 1
    sms = _sm_count(device)
    if num_programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // num_programs), max_context // 1024, 32))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, num_splits) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [tokens, heads, dim] and k_cache [blocks, block_size, kv_heads, dim]; "
                         f"got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not one of {_DTYPES}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _CACHE_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not one of {_CACHE_DTYPES}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    num_seqs = seq_lens.numel()
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks]; got {tuple(block_tables.shape)}")
    if seq_lens.dim() != 1 or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"need seq_lens [num_seqs] and query_start_loc [num_seqs + 1]; "
                         f"got {tuple(seq_lens.shape)} and {tuple(query_start_loc.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}) and be contiguous in head_dim")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be None or >= 1, got {num_splits}")
    tensors = [q, k_cache, v_cache, block_tables, seq_lens, query_start_loc] + ([out] if out is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {q.device}) unless TRITON_INTERPRET=1")
