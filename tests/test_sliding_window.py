"""Sliding-window attention (Mistral layout; Qwen2 windowing every layer): each query attends to
its last W positions, in both backends, against transformers on contexts several windows long."""
from __future__ import annotations

import pytest
import torch

from chatpager import LLM, SamplingParams
from chatpager.kernels import paged_attention_torch
from tests.conftest import hf_greedy

WINDOW = 32
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("arch,extra", [("mistral", {}),
                                        ("qwen2", {"use_sliding_window": True, "max_window_layers": 0})])
def test_windowed_model_matches_transformers_past_the_window(arch, extra, tiny_model_factory, hf_reference):
    path = tiny_model_factory(arch, sliding_window=WINDOW, **extra)
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)  # chunked prefill over a windowed cache
    assert llm.engine.max_model_len > WINDOW  # no longer capped at the window
    prompts = _prompts(1, [100, 7, 130])
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY))
    hf = hf_reference(path)
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == hf_greedy(hf, prompt, 24, ignore_eos=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_window_equals_a_dense_windowed_softmax(backend):
    """Decode, a chunk on a cached prefix and a whole prompt, with table entries before every
    window pointing nowhere (-1, as freed blocks would): never read. Triton runs interpreted."""
    gen = torch.Generator().manual_seed(0)
    bs, kv, heads, d, w = 4, 2, 4, 16, 10
    seq_lens, q_lens = [37, 30, 13], [1, 5, 13]
    k_cache, v_cache = torch.randn(40, bs, kv, d, generator=gen), torch.randn(40, bs, kv, d, generator=gen)
    tables = torch.full((3, 10), -1, dtype=torch.int32)
    free = torch.randperm(40, generator=gen).tolist()
    for i, (n, q) in enumerate(zip(seq_lens, q_lens)):
        first = max(0, n - q - w + 1) // bs
        for b in range(first, -(-n // bs)):
            tables[i, b] = free.pop()
    starts = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), heads, d, generator=gen)
    if backend == "torch":
        attend = paged_attention_torch
    else:
        from chatpager.kernels.triton_env import import_triton

        import_triton()
        from chatpager.kernels import paged_attention_triton as attend
    out = attend(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), starts, 0.3, sliding_window=w)
    for i, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        for j in range(ql):
            pos = n - ql + j
            keys = range(max(0, pos - w + 1), pos + 1)
            k = torch.stack([k_cache[tables[i, p // bs], p % bs] for p in keys]).repeat_interleave(2, 1)
            v = torch.stack([v_cache[tables[i, p // bs], p % bs] for p in keys]).repeat_interleave(2, 1)
            row = starts[i] + j
            p = (torch.einsum("hd,khd->hk", q[row], k) * 0.3).softmax(-1)
            torch.testing.assert_close(out[row], torch.einsum("hk,khd->hd", p, v), atol=1e-5, rtol=1e-5)


def test_mixed_full_and_windowed_layers_stay_capped_at_the_window(tiny_model_factory):
    """Qwen2 windowing only its later layers is not windowed here: it runs full attention,
    which is exact only inside the window, so its context stays capped there."""
    path = tiny_model_factory("qwen2", sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1)
    llm = LLM(path, num_blocks=16)
    assert llm.model.config.uniform_sliding_window is None
    assert llm.engine.max_model_len == WINDOW
