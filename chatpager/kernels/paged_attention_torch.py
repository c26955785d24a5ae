"""Pure-torch paged attention: the reference meaning of the attention backend contract.

Contract (shared with the Triton kernel):
    q               [num_tokens, num_heads, head_dim]   new tokens of all sequences, packed in order
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables    int32 [num_seqs, max_blocks]         padding entries are never read for meaning
    seq_lens        int32 [num_seqs]                     context length *after* this step's tokens
    query_start_loc int32 [num_seqs + 1]                 offsets of each sequence's queries in q
The queries of sequence i are the last q_len_i positions of its context and attend causally
to the whole context through the block table. num_heads is a multiple of num_kv_heads (GQA).

How (this is also the CPU engine's fast path, so cost matters):
- Decode rows (one query each) go in groups of sequences of similar length: each group's
  blocks are gathered with one `index_select` into a [G, L, kv, d] batch whose K/V stay
  within a few MiB (cache-resident, and small enough that malloc reuses the memory instead of
  mapping fresh pages every layer), then one masked SDPA call with the GQA group folded into
  the query axis.
- Prefill chunks (several queries) go one sequence at a time, over that sequence's own
  blocks only: no padding to the longest sequence, so a long chunk batched with short ones
  costs what it computes.
Masked key positions add exactly zero, so a sequence's result does not depend on which
other sequences share its group or step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DECODE_GROUP_SLOTS = 8192  # context slots gathered per decode group (K+V: 8192 * kv * d * 8 bytes)


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if out is None:
        out = q.new_empty(num_tokens, num_heads, head_dim)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decodes, prefills = [], []
    for i, n in enumerate(lens):
        (decodes if starts[i + 1] - starts[i] == 1 else prefills).append(i)
    if decodes:
        _decode(q, k_cache, v_cache, block_tables, lens, starts, decodes, scale, out)
    for i in prefills:
        _prefill(q, k_cache, v_cache, block_tables[i], lens[i], starts[i], starts[i + 1], scale, out)
    return out


def _gather(cache: torch.Tensor, blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows * n, bs, kv, d] blocks -> [rows, n * bs, kv, d] contexts. Indexing the cache as
    2-D rows takes torch's row-copy path: ~5x faster than index_select on the 4-D tensor."""
    g = cache.reshape(cache.shape[0], -1).index_select(0, blocks)
    return g.view(rows, -1, cache.shape[2], cache.shape[3])


def _decode(q, k_cache, v_cache, block_tables, lens, starts, seqs, scale, out) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    seqs = sorted(seqs, key=lambda i: lens[i])  # similar lengths together: little padding
    first = 0
    while first < len(seqs):
        nblk = -(-lens[seqs[first]] // block_size)
        last = first + 1
        while last < len(seqs):  # grow while the padded gather stays within the slot budget
            nb = -(-lens[seqs[last]] // block_size)
            if (last + 1 - first) * nb * block_size > DECODE_GROUP_SLOTS:
                break
            nblk, last = nb, last + 1
        idx = seqs[first:last]
        rows = len(idx)
        sel = torch.tensor(idx)
        tokens = torch.tensor([starts[i] for i in idx])
        blocks = block_tables.index_select(0, sel.to(block_tables.device))[:, :nblk]
        blocks = blocks.reshape(-1).long().clamp_(min=0)
        k = _gather(k_cache, blocks, rows).transpose(1, 2)  # [G, kv, L, d]
        v = _gather(v_cache, blocks, rows).transpose(1, 2)
        ctx = nblk * block_size
        valid = torch.tensor([lens[i] for i in idx], device=q.device).unsqueeze(1)
        mask = torch.arange(ctx, device=q.device) < valid  # [G, L]
        qg = q.index_select(0, tokens.to(q.device)).view(rows, num_kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.view(rows, 1, 1, ctx),
                                           scale=scale)
        out.index_copy_(0, tokens.to(q.device), o.reshape(rows, num_heads, head_dim).to(out.dtype))
        first = last


def _prefill(q, k_cache, v_cache, table, seq_len, start, end, scale, out) -> None:
    block_size = k_cache.shape[1]
    q_len = end - start
    nblk = -(-seq_len // block_size)
    blocks = table[:nblk].long().clamp_(min=0)
    k = _gather(k_cache, blocks, 1).transpose(1, 2)  # [1, kv, L, d]
    v = _gather(v_cache, blocks, 1).transpose(1, 2)
    qs = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, h, q_len, d]
    if seq_len == q_len:  # no cached context: plain causal (padding keys sit after every query)
        mask, causal = None, True
    else:  # query j sits at absolute position seq_len - q_len + j
        ctx = nblk * block_size
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        mask, causal = (torch.arange(ctx, device=q.device) <= q_pos).view(1, 1, q_len, ctx), False
    o = F.scaled_dot_product_attention(qs, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out[start:end] = o[0].transpose(0, 1).to(out.dtype)
