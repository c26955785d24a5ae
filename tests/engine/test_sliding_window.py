"""Sliding-window attention (Mistral layout; Qwen2 windowing every layer): each query attends to
its last W positions, in both backends, against transformers on contexts several windows long.
Blocks wholly behind the window are released (null table entries): a long sequence holds a
window's worth of blocks, prefix hits need only the blocks inside the window, and forks, beam
search and both kinds of preemption keep the pool's invariants with nulls in the tables."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from chatpager import LLM, SamplingParams
from chatpager.engine.core.block_keys import block_key
from chatpager.engine.core.block_manager import cdiv
from chatpager.engine.core.request import Sequence
from chatpager.engine.decoding import spec_decode
from chatpager.engine.sampling_params import BeamSearchParams
from chatpager.errors import PromptTooLong
from chatpager.kernels import paged_attention_torch
from tests.oracles import hf_greedy
from tests.oracles import assert_matches_hf

WINDOW = 32
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _check_blocks(engine) -> None:
    """Invariants 1-2 with nulls: refcounts equal the live table entries, free iff unreferenced,
    and each table's nulls are one leading run behind its window."""
    pool, held = engine.pool, Counter()
    for seq in engine.seqs.values():
        k = seq.num_null_blocks
        assert all(b is None for b in seq.blocks[:k]) and None not in seq.blocks[k:]
        assert k * engine.config.block_size <= max(0, seq.num_computed_tokens - WINDOW + 1)
        held.update(b.block_id for b in seq.blocks[k:])
    assert [held[b.block_id] for b in pool.blocks] == [b.ref_cnt for b in pool.blocks]
    assert {b.block_id for b in pool.free_queue} == {b.block_id for b in pool.blocks if b.ref_cnt == 0}


def _checked(llm: LLM) -> dict[str, int]:
    """Check the invariants after every step of `llm`; returns the most blocks any one sequence
    held in a step, split by whether the step computed one of its tokens (decode) or more (a
    prefill chunk, or a recompute after preemption); updated live."""
    engine, step, peaks = llm.engine, llm.engine.step, {"decode": 0, "prefill": 0}

    def checked_step():
        before = {s.request_id: s.num_computed_tokens for s in engine.seqs.values()}
        out = step()
        _check_blocks(engine)
        for seq in engine.seqs.values():
            computed = seq.num_computed_tokens - before.get(seq.request_id, seq.num_computed_tokens)
            if computed > 0:
                kind = "decode" if computed == 1 else "prefill"
                peaks[kind] = max(peaks[kind], len(seq.blocks) - seq.num_null_blocks)
        return out

    engine.step = checked_step
    return peaks


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("arch,extra", [("mistral", {}),
                                        ("qwen2", {"use_sliding_window": True, "max_window_layers": 0})])
def test_windowed_model_matches_transformers_past_the_window(arch, extra, tiny_model_factory, hf_reference):
    path = tiny_model_factory(arch, sliding_window=WINDOW, **extra)
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)  # chunked prefill over a windowed cache
    assert llm.engine.max_model_len > WINDOW  # no longer capped at the window
    peaks = _checked(llm)
    prompts = _prompts(1, [100, 7, 130])
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY))
    hf = hf_reference(path)
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == hf_greedy(hf, prompt, 24, ignore_eos=True)
    assert 0 < peaks["decode"] <= cdiv(WINDOW, 8) + 1


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
    assert llm.engine.block_manager.window is None  # a full-attention layer reads every block


def test_a_long_windowed_chat_holds_a_window_of_blocks_and_hits_without_its_evicted_head(
        tiny_model_factory, hf_reference):
    """130 prompt tokens + 60 generated on a pool of 16 blocks of 8 (128 slots): the sequence
    never holds more than its window needs, and its released head is evicted; the same prompt
    again (and one that diverges at 120) still hits the blocks inside the window."""
    path = tiny_model_factory("mistral", sliding_window=WINDOW)
    bs, chunk = 8, 64
    llm = LLM(path, block_size=bs, num_blocks=16, max_num_batched_tokens=chunk)
    engine, hf = llm.engine, hf_reference(path)
    peaks = _checked(llm)
    prompt, tail = _prompts(2, [130, 20])
    assert len(prompt) + 60 > engine.pool.num_blocks * bs  # the whole history would not fit
    first = llm.generate([prompt], SamplingParams(max_tokens=60, **GREEDY))[0]
    want = hf_greedy(hf, prompt, 60, ignore_eos=True)
    assert list(first.token_ids) == want
    assert peaks["decode"] <= cdiv(WINDOW, bs) + 1  # 5 blocks of 8 for a window of 32
    assert peaks["prefill"] <= cdiv(WINDOW - 1 + chunk, bs) + 1
    stats = llm.stats()
    assert stats["free_blocks"] == stats["num_blocks"]  # every block came back
    assert stats["window_released_blocks"] > 0 and stats["evictions"] > 0
    probe = Sequence("probe", prompt, SamplingParams(), max_len=10**6)
    head = block_key(engine.block_manager.root(probe), prompt[:bs])
    assert engine.pool.cached_block(head) is None  # the chain's head is gone: no hit from the start
    again, diverged = llm.generate([prompt, prompt[:120] + tail], SamplingParams(max_tokens=8, **GREEDY))
    assert list(again.token_ids) == want[:8]
    assert again.num_cached_tokens == len(prompt) - 1  # all but the last token, from the window
    assert list(diverged.token_ids) == hf_greedy(hf, prompt[:120] + tail, 8, ignore_eos=True)
    assert diverged.num_cached_tokens == 120


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_forks_and_preemption_on_a_tight_pool_keep_the_invariants(mode, tiny_model_factory, hf_reference):
    """Two samples per prompt (forked after a windowed prefill, nulls shared) on a pool too small
    for all of them: preempted (recomputed or swapped) and resumed, every sample equals
    transformers and every block comes back."""
    path = tiny_model_factory("mistral", sliding_window=WINDOW)
    llm = LLM(path, block_size=8, num_blocks=14, max_num_batched_tokens=32, preemption_mode=mode)
    peaks = _checked(llm)
    prompts = _prompts(3, [100, 120, 90])
    outs = llm.generate(prompts, SamplingParams(max_tokens=30, n=2, **GREEDY))
    hf = hf_reference(path)
    for prompt, out in zip(prompts, outs):
        want = hf_greedy(hf, prompt, 30, ignore_eos=True)
        assert [list(s.token_ids) for s in out.samples] == [want, want]
    stats = llm.stats()
    assert stats["preemptions"] > 0 and (mode == "recompute" or stats["swap_outs"] > 0)
    assert stats["free_blocks"] == stats["num_blocks"]
    assert peaks["decode"] <= cdiv(WINDOW, 8) + 1


def test_beam_search_past_the_window_matches_transformers(tiny_model_factory, hf_reference):
    path = tiny_model_factory("mistral", sliding_window=WINDOW)
    llm = LLM(path, block_size=8, num_blocks=24, max_num_batched_tokens=64)
    peaks = _checked(llm)
    params = BeamSearchParams(beam_width=3, max_tokens=24, ignore_eos=True)
    assert_matches_hf(llm, hf_reference(path), _prompts(4, [110]), params)
    stats = llm.stats()
    assert stats["window_released_blocks"] > 0 and stats["free_blocks"] == stats["num_blocks"]
    assert peaks["decode"] <= cdiv(WINDOW, 8) + 1


def test_snapshots_and_the_tui_block_table_show_released_entries(tiny_model_factory):
    from chatpager.tui.widgets.block_table import describe

    path = tiny_model_factory("mistral", sliding_window=WINDOW)
    llm = LLM(path, block_size=8, num_blocks=32)
    rid = llm.engine.add_request(_prompts(5, [100])[0], SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(4):  # the prefill and a few decodes
        llm.engine.step()
    snapshot = llm.engine.snapshot()
    (view,) = [v for v in snapshot.sequences if v.request_id == rid]
    nulls = len(view.block_table) - len(view.held_blocks)
    # exactly the blocks behind the window of the last token computed (a decode: 1 token a step)
    assert nulls == (view.num_computed_tokens - 1 - WINDOW + 1) // 8 > 0
    assert view.block_table[:nulls] == (-1,) * nulls
    assert all(snapshot.refcounts[b] == 1 for b in view.held_blocks)
    assert snapshot.stats["used_blocks"] == len(view.held_blocks)
    text = describe(view, snapshot.refcounts, 8, set(), columns=4).plain
    assert f"0-{nulls - 1}→ released" in text and "-1" not in text
    assert all(f"→{b:>4}" in text for b in view.held_blocks)


def test_the_pool_limits_a_windowed_prompt_only_if_the_window_does_not_fit_it(tiny_model_factory, hf_reference):
    """A windowed sequence holds at most cdiv(W - 1 + chunk, bs) + 1 blocks: 13 here. A pool of
    13 blocks (104 slots) serves a 130-token prompt; one of 12 refuses it, as for full attention."""
    path = tiny_model_factory("mistral", sliding_window=WINDOW)
    prompt = _prompts(6, [130])[0]
    fits = LLM(path, block_size=8, num_blocks=13, max_num_batched_tokens=64)
    assert fits.engine.max_model_len > len(prompt) > fits.engine.pool_tokens
    out = fits.generate([prompt], SamplingParams(max_tokens=6, **GREEDY))[0]
    assert list(out.token_ids) == hf_greedy(hf_reference(path), prompt, 6, ignore_eos=True)
    short = LLM(path, block_size=8, num_blocks=12, max_num_batched_tokens=64)
    with pytest.raises(PromptTooLong):
        short.engine.add_request(prompt, SamplingParams(max_tokens=6))


def test_speculation_past_the_window_matches_transformers(tiny_model_factory, hf_reference, monkeypatch):
    """Proposed tokens computed past the window, the rejected ones rolled back: the released
    entries stay behind every position written, and the tokens equal transformers' greedy."""
    path = tiny_model_factory("mistral", sliding_window=WINDOW)
    prompt = _prompts(7, [110])[0]
    want = hf_greedy(hf_reference(path), prompt, 40, ignore_eos=True)

    def propose(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
        """The right continuation with every third token spoiled: both accept and reject run."""
        done = len(tokens) - len(prompt)
        return [t if (done + i) % 3 else (t + 1) % 250 for i, t in enumerate(want[done:done + k])]

    monkeypatch.setattr(spec_decode, "propose_ngram", propose)
    llm = LLM(path, block_size=8, num_blocks=16, max_num_batched_tokens=64, speculative="ngram")
    peaks = _checked(llm)
    out = llm.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0]
    assert list(out.token_ids) == want
    stats = llm.stats()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]
    assert stats["window_released_blocks"] > 0 and stats["free_blocks"] == stats["num_blocks"]
    assert peaks["prefill"] <= cdiv(WINDOW - 1 + 64, 8) + 1
