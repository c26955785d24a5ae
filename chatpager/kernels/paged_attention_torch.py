"""Pure-torch paged attention: the reference meaning of the attention backend contract.

Contract (shared with the Triton kernel):
    q               [num_tokens, num_heads, head_dim]   new tokens of all sequences, packed in order
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables    int32 [num_seqs, max_blocks]         padding entries are never read for meaning
    seq_lens        int32 [num_seqs]                     context length *after* this step's tokens
    query_start_loc int32 [num_seqs + 1]                 offsets of each sequence's queries in q
The queries of sequence i are the last q_len_i positions of its context and attend causally
to the whole context through the block table. num_heads is a multiple of num_kv_heads (GQA).

Vectorized over sequences: gather each sequence's blocks into a padded [B, L, kv, d] view,
pad queries to [B, max_q, h, d], one masked SDPA call, unpack. No Python loop per sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.numel()
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    max_q = int(q_lens.max())
    max_len = int(seq_lens.max())
    num_ctx_blocks = -(-max_len // block_size)

    # Gather K/V through the block table: [B, nblk, bs, kv, d] -> [B, L, kv, d].
    table = block_tables[:, :num_ctx_blocks].long().clamp_(min=0)
    ctx = num_ctx_blocks * block_size
    k = k_cache[table].reshape(num_seqs, ctx, num_kv_heads, head_dim)
    v = v_cache[table].reshape(num_seqs, ctx, num_kv_heads, head_dim)

    # Scatter packed queries into a padded [B, max_q, h, d] batch.
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens)
    row_of_token = torch.arange(num_tokens, device=q.device) - query_start_loc[:-1].long()[seq_of_token]
    if max_q == 1:
        qp = q.unsqueeze(1)
    else:
        qp = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
        qp[seq_of_token, row_of_token] = q

    # Causal mask in absolute positions: query j of seq i sits at seq_len - q_len + j.
    q_pos = (seq_lens.long() - q_lens).unsqueeze(1) + torch.arange(max_q, device=q.device)
    k_pos = torch.arange(ctx, device=q.device)
    mask = k_pos.view(1, 1, ctx) <= q_pos.unsqueeze(2)  # [B, max_q, L]

    o = F.scaled_dot_product_attention(
        qp.transpose(1, 2).float() if q.dtype != k.dtype else qp.transpose(1, 2),
        k.transpose(1, 2).to(qp.dtype) if q.dtype != k.dtype else k.transpose(1, 2),
        v.transpose(1, 2).to(qp.dtype) if q.dtype != k.dtype else v.transpose(1, 2),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)  # [B, max_q, h, d]
    result = o.squeeze(1) if max_q == 1 else o[seq_of_token, row_of_token]
    result = result.to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
