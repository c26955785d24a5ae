"""The CPU attention path (`paged_attention_cpu`: the C kernel `cpu_attention` for decode rows and
short chunks) equals the torch reference through random block tables: GQA groups, head dims with and without a compiled
specialisation, partial and single-key blocks, shared blocks, sliding windows over null entries,
mixed steps with prefill chunks, and enough rows to take the threaded path."""
from __future__ import annotations

import logging
import os
import random
import shutil

import pytest
import torch

from chatpager.kernels import cpu_attention, cpu_build
from chatpager.kernels.paged_attention_cpu import paged_attention_cpu, plan_cpu_attention, write_kv_cpu
from chatpager.kernels.paged_attention_torch import paged_attention_torch, plan_paged_attention

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU lacks AVX512 or g++ is missing")


def test_the_kernel_is_built_wherever_the_cpu_and_a_compiler_allow():
    # the tests below skip without the kernel: this one fails instead if a build breaks
    switched_off = os.environ.get("CHATPAGER_CPU_ATTENTION") == "0"  # as on a CPU without AVX512
    assert cpu_attention.available() == (cpu_build.cpu_supports(cpu_build.AVX512_CPU_FLAGS)
                                         and bool(shutil.which("g++")) and not switched_off)


def step(seed: int, seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block: int = 16,
         shared_blocks: int = 0, num_blocks: int = 300, dtype: torch.dtype = torch.float32):
    """A random step: seqs are (query length, context length); the first `shared_blocks` blocks of
    every table are the same ones (a common prefix); the others are drawn at random, so never
    consecutive runs. Returns the attention arguments."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    prefix = [free.pop() for _ in range(shared_blocks)]
    tables = []
    for _, ctx in seqs:
        need = -(-ctx // block)
        own = prefix[:need]
        tables.append(own + [free.pop() for _ in range(need - len(own))])
    width = max(len(t) for t in tables)
    starts = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor([q for q, _ in seqs]).cumsum(0)
    cache = (num_blocks, block, kv_heads, head_dim)
    return (torch.randn(int(starts[-1]), heads, head_dim, generator=gen),
            torch.randn(cache, generator=gen).to(dtype), torch.randn(cache, generator=gen).to(dtype),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            torch.tensor([c for _, c in seqs], dtype=torch.int32), starts, head_dim ** -0.5)


def both_ways(args, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kernel's output, the reference's) for one step."""
    block = args[1].shape[1]
    with_kernel = plan_cpu_attention(args[3], args[4], args[5], block, window)
    reference = plan_paged_attention(args[3], args[4], args[5], block, window)
    assert with_kernel.decode is not None
    return paged_attention_cpu(*args, plan=with_kernel), paged_attention_torch(*args, plan=reference)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1), (12, 2), (20, 2)])  # groups 3, 1, 8, 6, 10
@pytest.mark.parametrize("head_dim", [64, 128, 40])  # 40: the generic path, a masked tail
def test_decode_rows_equal_the_reference(heads, kv_heads, head_dim):
    lengths = [1, 15, 16, 17, 100, 333]  # one key, partial blocks, whole blocks
    got, want = both_ways(step(heads + head_dim, [(1, n) for n in lengths], heads, kv_heads, head_dim))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_cache_is_read_as_float32(dtype):
    got, want = both_ways(step(7, [(1, 50), (1, 200)], 9, 3, 64, dtype=dtype))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_block_sizes_other_than_the_tile():
    for block in (1, 4, 32, 64):
        got, want = both_ways(step(block, [(1, 1), (1, 37), (1, 130)], 6, 2, 64, block=block))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_rows_sharing_their_first_blocks_read_them_in_place():
    got, want = both_ways(step(3, [(1, 300), (1, 250), (1, 180), (1, 64)], 9, 3, 64, shared_blocks=10))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("window", [1, 16, 50, 100])
def test_a_sliding_window_never_reads_the_null_entries_before_it(window):
    args = list(step(5, [(1, 300), (1, 64), (1, 31), (1, 120)], 8, 2, 64))
    tables = args[3].clone()
    for i, n in enumerate(args[4].tolist()):  # entries wholly before the window were freed
        tables[i, :max(0, n - window) // 16] = -1
    args[3] = tables
    got, want = both_ways(args, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_a_mixed_step_keeps_long_chunks_on_sdpa_and_short_ones_in_the_kernel():
    args = step(11, [(1, 90), (12, 60), (1, 1), (30, 30), (1, 47), (5, 5), (5, 133)], 9, 3, 64, shared_blocks=3)
    plan = plan_cpu_attention(args[3], args[4], args[5], 16)
    # a chunk of <= KERNEL_CHUNK_ROWS queries (a speculative verify step) is one kernel row per
    # query, each seeing the keys up to its own position
    assert plan.decode[:, 0].tolist() == [0, 13, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]
    assert plan.decode[-5:, 2].tolist() == [129, 130, 131, 132, 133] and len(plan.prefills.prefills) == 2
    got, want = both_ways(args)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("window", [3, 16, 40])
def test_short_chunks_under_a_sliding_window_equal_the_reference(window):
    args = list(step(13, [(5, 120), (3, 64), (1, 80), (8, 8)], 8, 2, 64))
    tables = args[3].clone()
    for i, n in enumerate(args[4].tolist()):  # entries wholly before the first query's window were freed
        q_len = int(args[5][i + 1] - args[5][i])
        tables[i, :max(0, n - q_len + 1 - window) // 16] = -1
    args[3] = tables
    got, want = both_ways(args, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("lengths", [[200 + 7 * i for i in range(48)], [4000, 3500]])  # items: rows; kv heads
def test_many_rows_on_every_thread_equal_the_reference(lengths):
    args = step(13, [(1, n) for n in lengths], 9, 3, 64, num_blocks=2000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, want = both_ways(args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_the_log_sum_exp_of_each_head_is_returned_when_asked():
    q, k, v, tables, lens, starts, scale = step(17, [(1, 40), (1, 7)], 4, 2, 64)
    rows = torch.tensor([[0, 0, 40, 0], [1, 1, 7, 2]], dtype=torch.int32)  # the second from its third key
    out, lse = torch.empty_like(q), torch.empty(2, 4)
    cpu_attention.decode_attention(q, k, v, tables, rows, scale, out, lse)
    for r, (n, first) in enumerate([(40, 0), (7, 2)]):
        keys = k[tables[r].long()].reshape(-1, 2, 64)[first:n].repeat_interleave(2, 1)  # [n, heads, d]
        values = v[tables[r].long()].reshape(-1, 2, 64)[first:n].repeat_interleave(2, 1)
        scores = torch.einsum("hd,khd->hk", q[r], keys) * scale
        torch.testing.assert_close(lse[r], scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[r], torch.einsum("hk,khd->hd", scores.softmax(-1), values),
                                   atol=2e-5, rtol=1e-4)


@needs_kernel
def test_the_torch_profiler_names_the_kernel_call():
    from torch.profiler import profile

    args = step(19, [(1, 20)], 4, 2, 64)
    with profile() as prof:
        paged_attention_cpu(*args)
    assert "cpu_attention::decode" in {e.key for e in prof.key_averages()}


def test_a_failed_build_falls_back_to_the_reference_with_one_logged_line(broken_compiler, caplog):
    from chatpager.engine.model.attention import select_backend

    with caplog.at_level(logging.INFO, logger="chatpager.kernels.cpu_attention"):
        assert not cpu_attention.available()
        assert select_backend("auto", torch.device("cpu")).name == "torch"
        assert select_backend("auto", torch.device("cpu"), kv_quantized=True).name == "torch"
        with pytest.raises(ValueError, match="did not build"):
            select_backend("cpu", torch.device("cpu"))
    assert len([r for r in caplog.records if "torch's attention" in r.getMessage()]) == 1


def test_chatpager_cpu_attention_0_disables_the_kernel(monkeypatch):
    monkeypatch.setenv("CHATPAGER_CPU_ATTENTION", "0")
    cpu_attention._library.cache_clear()
    try:
        assert not cpu_attention.available()
    finally:
        cpu_attention._library.cache_clear()


@needs_kernel
def test_new_kv_go_to_their_slots_and_skipped_slots_are_untouched():
    k_cache, v_cache = torch.zeros(6, 16, 3, 64), torch.zeros(6, 16, 3, 64)
    k, v = torch.randn(5, 3, 64), torch.randn(5, 3, 64)
    slots = torch.tensor([17, -1, 0, 95, 40])
    write_kv_cpu(k, v, k_cache, v_cache, slots)  # the C write: K/V already in the cache's dtype
    want_k, want_v = torch.zeros(96, 3, 64), torch.zeros(96, 3, 64)
    keep = slots >= 0
    want_k.index_copy_(0, slots[keep], k[keep])
    want_v.index_copy_(0, slots[keep], v[keep])
    assert torch.equal(k_cache.view(96, 3, 64), want_k) and torch.equal(v_cache.view(96, 3, 64), want_v)
    with pytest.raises(IndexError, match="out of range"):
        cpu_attention.write_kv(k, v, k_cache, v_cache, torch.tensor([0, 1, 2, 3, 96]))
    bf16 = torch.zeros(6, 16, 3, 64, dtype=torch.bfloat16)
    assert not cpu_attention.can_write_kv(k, bf16, slots)  # a conversion: torch's index_copy_ does it
    write_kv_cpu(k, v, bf16, bf16.clone(), slots)
    assert torch.equal(bf16.view(96, 3, 64)[17], k[0].bfloat16())
