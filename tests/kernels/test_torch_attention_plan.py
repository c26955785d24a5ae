"""The torch attention's per-step plan: shared prefixes attended once (cascade), decode rows in
groups, prefill chunks one sequence at a time, all equal to a float64 dense computation (the
plan without the C decode kernel, which `test_cpu_attention_kernel` compares with it)."""
from __future__ import annotations

import importlib
import random

import pytest
import torch

from chatpager.kernels import paged_attention_torch

pat = importlib.import_module("chatpager.kernels.paged_attention_torch")  # the module, not the function

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 16, 4


def dense(q, k_cache, v_cache, tables, seq_lens, starts, scale):
    """Each sequence on its own: causal attention over its context, in float64."""
    group = HEADS // KV_HEADS
    outs = []
    for i, n in enumerate(seq_lens.tolist()):
        s, e = starts[i].item(), starts[i + 1].item()
        blocks = tables[i, :-(-n // BLOCK)].long()
        k = k_cache[blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:n].double().repeat_interleave(group, 1)
        v = v_cache[blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:n].double().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), k) * scale
        q_pos = torch.arange(n - (e - s), n).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(n) > q_pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(outs).float()


def batch(rng: random.Random, seqs: list[tuple[int, int, str | None, int]], num_blocks: int = 400):
    """seqs: (query length, context length, prefix name or None, blocks of that prefix)."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    prefixes: dict[str, list[int]] = {}
    tables, lens, q_lens = [], [], []
    for q_len, ctx, name, shared in seqs:
        need = -(-ctx // BLOCK)
        table = []
        if name is not None:
            table = prefixes.setdefault(name, [free.pop() for _ in range(shared)])[:need]
        tables.append(table + [free.pop() for _ in range(need - len(table))])
        lens.append(ctx)
        q_lens.append(q_len)
    width = max(len(t) for t in tables)
    starts = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(q_lens).cumsum(0)
    return (torch.randn(int(starts[-1]), HEADS, HEAD_DIM),
            torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM), torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32), starts, HEAD_DIM ** -0.5)


def count(blocks) -> int:
    return blocks.stop - blocks.start if isinstance(blocks, slice) else blocks.numel()


def test_a_run_of_consecutive_blocks_is_read_in_place_and_matches_dense():
    rng = random.Random(3)
    args = list(batch(rng, [(1, 20, None, 0), (5, 12, None, 0)]))  # 5 and 3 blocks of 4
    # both sequences' blocks laid out as consecutive runs of the pool, as a lone chat's are
    args[3] = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 0, 0]], dtype=torch.int32)
    plan = pat.plan_paged_attention(args[3], args[4], args[5], BLOCK)
    assert plan.rows[0].blocks == slice(0, 5) and plan.prefills[0].blocks == slice(5, 8)
    assert pat._gather(args[1], plan.rows[0].blocks, 1).data_ptr() == args[1].data_ptr()  # no copy
    torch.testing.assert_close(paged_attention_torch(*args, plan=plan), dense(*args), atol=1e-5, rtol=1e-5)


def test_decode_rows_sharing_a_prefix_attend_it_once_and_match_dense():
    rng = random.Random(0)
    seqs = ([(1, rng.randint(40, 90), "system", 8) for _ in range(7)]
            + [(1, rng.randint(50, 70), "other", 10) for _ in range(3)]
            + [(1, rng.randint(1, 60), None, 0) for _ in range(5)])
    args = batch(rng, seqs)
    plan = pat.plan_paged_attention(args[3], args[4], args[5], BLOCK)
    assert sorted((s.tokens.numel(), count(s.blocks)) for s in plan.shared) == [(3, 10), (7, 8)]
    assert not plan.prefills
    torch.testing.assert_close(paged_attention_torch(*args, plan=plan), dense(*args), atol=1e-5, rtol=1e-5)


def test_mixed_step_of_decodes_and_prefill_chunks_matches_dense():
    rng = random.Random(1)
    seqs = ([(1, rng.randint(40, 90), "system", 8) for _ in range(4)]
            + [(12, 60, "system", 8), (30, 30, None, 0), (1, 9, None, 0), (5, 5, None, 0)])
    args = batch(rng, seqs)
    plan = pat.plan_paged_attention(args[3], args[4], args[5], BLOCK)
    assert len(plan.prefills) == 3 and len(plan.shared) == 1
    torch.testing.assert_close(paged_attention_torch(*args, plan=plan), dense(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots", [4, 64, 10_000])
def test_decode_grouping_does_not_change_results(slots, monkeypatch):
    rng = random.Random(2)
    args = batch(rng, [(1, rng.randint(1, 120), None, 0) for _ in range(20)])
    monkeypatch.setattr(pat, "DECODE_GROUP_SLOTS", slots)
    plan = pat.plan_paged_attention(args[3], args[4], args[5], BLOCK)
    assert (len(plan.rows) == 20) == (slots == 4)  # a group never exceeds the budget unless alone
    torch.testing.assert_close(paged_attention_torch(*args, plan=plan), dense(*args), atol=1e-5, rtol=1e-5)


def test_a_short_common_prefix_is_not_split_off():
    rng = random.Random(3)
    args = batch(rng, [(1, 40, "p", pat.MIN_SHARED_BLOCKS - 1) for _ in range(4)])
    assert not pat.plan_paged_attention(args[3], args[4], args[5], BLOCK).shared
