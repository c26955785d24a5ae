"""The CPU fast path of the attention contract (`paged_attention_torch` states it and stays the
oracle): decode rows through the C kernel `cpu_attention`, prefill chunks through the
reference's own per-sequence path.

- Every decode row (one query) goes to `cpu_attention.decode_attention`, which reads K/V in
  place through the block table (a sliding window's null entries never read), all rows of the
  step in one call. So does every query of a chunk of at most `KERNEL_CHUNK_ROWS` (a
  speculative verify step, a short chunked-prefill tail), as one row per query that sees the
  keys up to its own position.
- Longer chunks go to the reference's prefill path (one SDPA call per sequence).
- Shared prefixes are not split off (no cascade): the kernel reads each row's blocks in place,
  and a same-time A/B at 16 x 300 tokens, 75 % shared, found no gain in splitting.
- A query the kernel does not take (a dtype or head size it lacks) runs the whole step on the
  reference; a non-float32 query runs it in float32 and is copied back.
- `write_kv_cpu` stores K/V already in the cache's dtype by one C call; anything else (a
  conversion) by the reference's `index_copy_`.
`select_backend` picks this path on a CPU where `cpu_attention` builds (CHATPAGER_CPU_ATTENTION=0
or a failed build: the reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatpager.kernels import cpu_attention
from chatpager.kernels.paged_attention_torch import (TorchAttentionPlan, paged_attention_torch,
                                                     plan_paged_attention, plan_prefill)
from chatpager.kernels.write_kv_torch import write_kv_torch

KERNEL_CHUNK_ROWS = 8


@dataclass(slots=True)
class CpuAttentionPlan:
    decode: torch.Tensor | None  # int32 [R, 4]: (token, sequence, keys, first visible key) per kernel row
    prefills: TorchAttentionPlan  # the longer chunks, for the reference
    window: int | None  # the sliding window the plan was made for


def plan_cpu_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                       block_size: int, sliding_window: int | None = None) -> CpuAttentionPlan:
    """Everything about a step's attention that does not depend on the layer."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    prefills, rows = TorchAttentionPlan(), []
    for i, n in enumerate(lens):
        q_len = starts[i + 1] - starts[i]
        if q_len > KERNEL_CHUNK_ROWS:
            table = block_tables[i, :-(-n // block_size)].tolist()
            prefills.prefills.append(plan_prefill(table, n, starts[i], starts[i + 1], block_size,
                                                  block_tables.device, sliding_window))
            continue
        for j in range(q_len):  # query j sits at position n - q_len + j: it sees keys up to there
            keys = n - q_len + j + 1
            rows.append((starts[i] + j, i, keys, max(0, keys - sliding_window) if sliding_window else 0))
    decode = torch.tensor(rows, dtype=torch.int32) if rows else None
    return CpuAttentionPlan(decode, prefills, sliding_window)


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    plan: CpuAttentionPlan | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention_torch`'s contract. `sliding_window` is used only when there is no `plan`."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if plan is None:
        plan = plan_cpu_attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1], sliding_window)
    if out is None:
        out = q.new_empty(q.shape)
    q32 = q if q.dtype is torch.float32 else q.float()
    if not cpu_attention.supports(q32, k_cache):  # a cache or shape the kernel does not take
        reference = plan_paged_attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1], plan.window)
        return paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                     out=out, plan=reference)
    if q32 is not q or out.dtype is not torch.float32 or not out.is_contiguous():
        # the kernel reads and writes float32: the whole step in float32, copied into `out`
        out.copy_(paged_attention_cpu(q32, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                      plan=plan))
        return out
    if plan.decode is not None:
        cpu_attention.decode_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                                       block_tables.to(torch.int32).contiguous(), plan.decode, scale, out)
    if plan.prefills.prefills:
        paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
                              plan=plan.prefills)
    return out


def write_kv_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """`write_kv_torch`'s contract: one C call when K/V are already in the cache's dtype."""
    if cpu_attention.can_write_kv(k, k_cache, slot_mapping):
        cpu_attention.write_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_torch(k, v, k_cache, v_cache, slot_mapping)
