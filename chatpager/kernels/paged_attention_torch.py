"""Pure-torch paged attention: the reference meaning of the attention backend contract.

Contract (shared with the Triton kernel):
    q               [num_tokens, num_heads, head_dim]   new tokens of all sequences, packed in order
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables    int32 [num_seqs, max_blocks]         padding entries are never read for meaning
    seq_lens        int32 [num_seqs]                     context length *after* this step's tokens
    query_start_loc int32 [num_seqs + 1]                 offsets of each sequence's queries in q
The queries of sequence i are the last q_len_i positions of its context and attend causally
to the whole context through the block table. num_heads is a multiple of num_kv_heads (GQA).

How (the CPU engine's path when the C kernel of `paged_attention_cpu` cannot run, and that
path's prefill chunks, so cost matters). A `TorchAttentionPlan`, made once per step from the
metadata alone (`plan_paged_attention`), says what each layer does:
- Decode rows (one query each) whose block tables start with the same run of blocks (a shared
  system prompt or history) attend to that shared prefix together: its K/V is gathered once
  and all their queries meet it in one call (cascade attention). Each row's remaining blocks
  are attended separately and the two parts are merged by their log-sum-exp.
- The remaining decode rows (or suffixes) go in groups of similar length: each group's blocks
  are gathered with one `index_select` into a [G, L, kv, d] batch of a few MiB (cache-resident,
  and reused by malloc rather than freshly mapped), then one masked flash-attention call with
  the GQA group folded into the query axis.
- Prefill chunks (several queries) go one sequence at a time over that sequence's own blocks:
  no padding to the longest sequence, so a long chunk batched with short ones costs what it
  computes.
- A sliding window (`sliding_window` W: each query sees its last W positions, itself included)
  drops every block wholly before a row's window from its table (never read: it may be a freed,
  null entry) and masks the positions before the window in the first block kept; rows are
  then not split by shared prefix.
Masked keys add exactly zero, so grouping and padding do not change a row's result. Splitting
off a shared prefix does, at the level of float rounding (the log-sum-exp merge), and whether
it happens depends on the other rows of the step: invariant 6 holds up to that tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DECODE_GROUP_SLOTS = 2048  # context slots per decode group: its K+V (3 MiB for SmolLM2) stays in L2/L3
MIN_SHARED_BLOCKS = 4  # a shorter common prefix is not worth a separate pass


@dataclass(slots=True)
class _Rows:
    """Decode rows attended together over padded, gathered blocks."""

    tokens: torch.Tensor  # long [G]: rows of q and out
    blocks: torch.Tensor | slice  # long [G * n]: each row's blocks, padded with block 0 (`_block_index`)
    mask: torch.Tensor  # float [G, 1, 1, n * block_size]: 0 for a key of that row, -inf after it


@dataclass(slots=True)
class _Shared:
    """A run of blocks at the start of several decode rows' tables."""

    tokens: torch.Tensor  # long [m]
    blocks: torch.Tensor | slice  # [p] (`_block_index`)


@dataclass(slots=True)
class _Prefill:
    start: int
    end: int
    blocks: torch.Tensor | slice  # the sequence's blocks (`_block_index`)
    mask: torch.Tensor | None  # bool [1, 1, q_len, L]; None: plain causal from position 0


@dataclass(slots=True)
class TorchAttentionPlan:
    rows: list[_Rows] = field(default_factory=list)
    shared: list[_Shared] = field(default_factory=list)
    prefills: list[_Prefill] = field(default_factory=list)


def plan_paged_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         block_size: int, sliding_window: int | None = None) -> TorchAttentionPlan:
    """Everything about a step's attention that does not depend on the layer."""
    dev = block_tables.device
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    tables = block_tables.tolist()
    plan = TorchAttentionPlan()
    decode: list[tuple[int, list[int], int, int]] = []  # (token row, blocks, keys, first visible key)
    by_first: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        table = tables[i][:-(-n // block_size)]
        if starts[i + 1] - starts[i] > 1:
            plan.prefills.append(plan_prefill(table, n, starts[i], starts[i + 1], block_size, dev, sliding_window))
        elif sliding_window and n > sliding_window:
            first = (n - sliding_window) // block_size  # blocks wholly before the window
            decode.append((starts[i], table[first:], n - first * block_size, n - sliding_window - first * block_size))
        else:
            by_first.setdefault(table[0], []).append(len(decode))
            decode.append((starts[i], table, n, 0))
    for members in by_first.values() if not sliding_window else ():
        if len(members) > 1:
            _split_shared_prefix(plan, decode, members, block_size, dev)
    _group_rows(plan, decode, block_size, dev)
    return plan


def plan_prefill(table: list[int], seq_len: int, start: int, end: int, block_size: int,
                 dev: torch.device, window: int | None = None) -> _Prefill:
    """One sequence's chunk of queries over its blocks (`table`: the sequence's, in order)."""
    q_len = end - start
    first = max(0, seq_len - q_len - window + 1) // block_size if window else 0  # blocks no query sees
    table = table[first:]
    mask = None
    if seq_len != q_len or window:  # cached context before the chunk: query j sits at seq_len - q_len + j
        ctx = len(table) * block_size
        q_pos = torch.arange(seq_len - q_len, seq_len, device=dev).unsqueeze(1)
        k_pos = torch.arange(first * block_size, first * block_size + ctx, device=dev)
        visible = k_pos <= q_pos
        if window:
            visible &= k_pos > q_pos - window
        mask = visible.view(1, 1, q_len, ctx)
    return _Prefill(start, end, _block_index(table, dev), mask)


def _split_shared_prefix(plan: TorchAttentionPlan, decode: list, members: list[int], block_size: int,
                         dev: torch.device) -> None:
    tables = [decode[m][1] for m in members]
    # every member keeps at least its last block (the one being written) for its own pass
    limit = min(len(t) for t in tables) - 1
    p = 0
    while p < limit and all(t[p] == tables[0][p] for t in tables):
        p += 1
    if p < MIN_SHARED_BLOCKS:
        return
    plan.shared.append(_Shared(torch.tensor([decode[m][0] for m in members], dtype=torch.long, device=dev),
                               _block_index(tables[0][:p], dev)))
    for m in members:
        row, table, n, _ = decode[m]
        decode[m] = (row, table[p:], n - p * block_size, 0)


def _group_rows(plan: TorchAttentionPlan, decode: list, block_size: int, dev: torch.device) -> None:
    decode = sorted(decode, key=lambda r: r[2])  # similar lengths together: little padding
    first = 0
    while first < len(decode):
        nblk, last = len(decode[first][1]), first + 1
        while last < len(decode):  # grow while the padded gather stays within the slot budget
            nb = len(decode[last][1])
            if (last + 1 - first) * nb * block_size > DECODE_GROUP_SLOTS:
                break
            nblk, last = nb, last + 1
        group = decode[first:last]
        blocks = [b for _, t, _, _ in group for b in t + [0] * (nblk - len(t))]
        keys = torch.tensor([n for _, _, n, _ in group], device=dev).unsqueeze(1)
        mask = torch.zeros(len(group), nblk * block_size, device=dev)
        key_idx = torch.arange(nblk * block_size, device=dev)
        mask.masked_fill_(key_idx >= keys, float("-inf"))
        if any(lo for _, _, _, lo in group):  # sliding window: keys before it are out too
            mask.masked_fill_(key_idx < torch.tensor([lo for _, _, _, lo in group], device=dev).unsqueeze(1),
                              float("-inf"))
        plan.rows.append(_Rows(torch.tensor([r for r, _, _, _ in group], dtype=torch.long, device=dev),
                               _block_index(blocks, dev), mask.view(len(group), 1, 1, -1)))
        first = last


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    plan: TorchAttentionPlan | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`sliding_window` is used only when there is no `plan` (a plan already holds it)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if plan is None:
        plan = plan_paged_attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1], sliding_window)
    if out is None:
        out = q.new_empty(num_tokens, num_heads, head_dim)
    lse = q.new_empty(num_tokens, num_heads, dtype=torch.float32) if plan.shared else None
    for rows in plan.rows:
        _attend_rows(q, k_cache, v_cache, rows, scale, out, lse)
    for shared in plan.shared:
        _attend_shared(q, k_cache, v_cache, shared, scale, out, lse)
    for p in plan.prefills:
        _attend_prefill(q, k_cache, v_cache, p, scale, out)
    return out


def _block_index(blocks: list[int], dev: torch.device) -> torch.Tensor | slice:
    """How to pick these blocks out of the cache: a slice when they are one run of consecutive
    blocks (a lone chat's blocks usually are: the pool hands out free blocks in order), so
    attention reads them in place; otherwise an index for one gathering copy."""
    if blocks and blocks[-1] - blocks[0] == len(blocks) - 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return slice(blocks[0], blocks[-1] + 1)
    return torch.tensor(blocks, dtype=torch.long, device=dev)


def _gather(cache: torch.Tensor, blocks: torch.Tensor | slice, rows: int) -> torch.Tensor:
    """[rows * n, bs, kv, d] blocks -> [rows, kv, n * bs, d]. A run of consecutive blocks is a
    view of the cache; otherwise indexing the cache as 2-D rows takes torch's row-copy path
    (~5x faster than index_select on the 4-D tensor)."""
    if isinstance(blocks, slice):
        g = cache[blocks]
    else:
        g = cache.reshape(cache.shape[0], -1).index_select(0, blocks)
    return g.view(rows, -1, cache.shape[2], cache.shape[3]).transpose(1, 2)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA that also returns the log-sum-exp of each query's scores (for merging parts)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()).to(q.dtype), lse


def _attend_rows(q, k_cache, v_cache, rows: _Rows, scale: float, out: torch.Tensor,
                 lse: torch.Tensor | None) -> None:
    g, num_heads, head_dim = rows.tokens.numel(), q.shape[1], q.shape[2]
    kv = k_cache.shape[2]
    k, v = _gather(k_cache, rows.blocks, g).to(q.dtype), _gather(v_cache, rows.blocks, g).to(q.dtype)
    qg = q.index_select(0, rows.tokens).view(g, kv, num_heads // kv, head_dim)
    o, s = _flash(qg, k, v, rows.mask.to(q.dtype), scale)
    out.index_copy_(0, rows.tokens, o.reshape(g, num_heads, head_dim).to(out.dtype))
    if lse is not None:
        lse.index_copy_(0, rows.tokens, s.reshape(g, num_heads).float())


def _attend_shared(q, k_cache, v_cache, shared: _Shared, scale: float, out: torch.Tensor,
                   lse: torch.Tensor) -> None:
    m, num_heads, head_dim = shared.tokens.numel(), q.shape[1], q.shape[2]
    kv = k_cache.shape[2]
    group = num_heads // kv
    k, v = _gather(k_cache, shared.blocks, 1).to(q.dtype), _gather(v_cache, shared.blocks, 1).to(q.dtype)
    # every member's queries against the one copy of the prefix: [1, kv, m * group, d]
    qs = q.index_select(0, shared.tokens).view(m, kv, group, head_dim).transpose(0, 1).reshape(1, kv, -1, head_dim)
    o_p, lse_p = _flash(qs, k, v, None, scale)
    o_p = o_p.view(kv, m, group, head_dim).transpose(0, 1).reshape(m, num_heads, head_dim).float()
    lse_p = lse_p.view(kv, m, group).transpose(0, 1).reshape(m, num_heads).float()
    o_s, lse_s = out.index_select(0, shared.tokens).float(), lse.index_select(0, shared.tokens)
    top = torch.maximum(lse_p, lse_s)
    w_p, w_s = torch.exp(lse_p - top), torch.exp(lse_s - top)
    merged = (o_p * w_p.unsqueeze(-1) + o_s * w_s.unsqueeze(-1)) / (w_p + w_s).unsqueeze(-1)
    out.index_copy_(0, shared.tokens, merged.to(out.dtype))


def _attend_prefill(q, k_cache, v_cache, p: _Prefill, scale: float, out: torch.Tensor) -> None:
    k, v = _gather(k_cache, p.blocks, 1).to(q.dtype), _gather(v_cache, p.blocks, 1).to(q.dtype)
    qs = q[p.start:p.end].transpose(0, 1).unsqueeze(0)  # [1, h, q_len, d]
    # no mask: plain causal from position 0 (the padding keys after the last query stay out)
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=p.mask, is_causal=p.mask is None, scale=scale,
                                       enable_gqa=qs.shape[1] != k.shape[1])
    out[p.start:p.end] = o[0].transpose(0, 1).to(out.dtype)
