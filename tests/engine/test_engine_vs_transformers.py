"""Greedy tokens from chatpager equal transformers' generate on the same weights."""
from __future__ import annotations

import random

import pytest

from chatpager import LLM, SamplingParams
from chatpager.engine.model.tiny_model import ARCHS
from tests.oracles import hf_greedy

GREEDY = dict(temperature=0.0)


def random_prompts(seed: int, lengths: list[int], vocab: int = 250) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_matches_hf(llm: LLM, hf, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = True):
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **GREEDY))
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == hf_greedy(hf, prompt, max_tokens, ignore_eos)
    return outs


@pytest.mark.parametrize("attention", ["auto", "torch"])  # auto: the C kernel on this CPU; torch: the reference
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_layout_matches_transformers_on_a_mixed_batch(arch, attention, tiny_model_factory, hf_reference):
    path = tiny_model_factory(arch)
    llm = LLM(model=path, attention=attention)
    assert_matches_hf(llm, hf_reference(path), random_prompts(1, [1, 7, 33, 90]), max_tokens=20)


@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_block_size_does_not_change_tokens(block_size, tiny_llama, hf_reference):
    llm = LLM(model=tiny_llama, block_size=block_size)
    assert_matches_hf(llm, hf_reference(tiny_llama), random_prompts(2, [5, 40, 71]), max_tokens=24)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_pool_too_small_preempts_and_still_matches(mode, tiny_llama, hf_reference):
    # 6 requests x (25..40 prompt + 30 new) tokens need ~380 slots; the pool has 96.
    llm = LLM(model=tiny_llama, block_size=4, num_blocks=24, preemption_mode=mode)
    assert_matches_hf(llm, hf_reference(tiny_llama), random_prompts(3, [25, 30, 40, 28, 33, 26]), max_tokens=30)
    stats = llm.stats()
    assert stats["preemptions"] > 0
    if mode == "swap":  # swapped out and back in, not silently recomputed
        assert stats["swap_outs"] > 0 and stats["swap_ins"] == stats["swap_outs"]
    else:
        assert stats["swap_outs"] == stats["swap_ins"] == 0
    assert stats["free_blocks"] == stats["num_blocks"]  # nothing leaked


def test_chunked_prefill_matches(tiny_llama, hf_reference):
    llm = LLM(model=tiny_llama, max_num_batched_tokens=16)  # a 90-token prompt takes 6 steps
    assert_matches_hf(llm, hf_reference(tiny_llama), random_prompts(4, [90, 3, 50]), max_tokens=12)


def test_the_cpu_default_is_the_c_kernel_where_it_builds_and_the_reference_elsewhere(tiny_llama):
    from chatpager.kernels import cpu_attention

    assert LLM(model=tiny_llama).model_info["attention"] == ("cpu" if cpu_attention.available() else "torch")


@pytest.mark.slow
def test_default_model_chats_match_transformers(default_llm, hf_reference):
    # Exact greedy equality with transformers is the oracle (the exact float32 path). Margins
    # (AMD EPYC, 2026-12-04): along these replies the two best logits are >= 0.057 apart, the
    # two implementations' logits <= 6e-5: rounding on another CPU cannot flip a token.
    llm = default_llm
    hf = hf_reference(llm.model_info["path"])
    system = {"role": "system", "content": "You are a concise, friendly assistant. Answer in one or two sentences."}
    questions = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?"]
    convs = [[system, {"role": "user", "content": q}] for q in questions]
    params = SamplingParams(max_tokens=32, **GREEDY)
    first = llm.chat(convs, params)
    for conv, out in zip(convs, first):
        assert list(out.token_ids) == hf_greedy(hf, llm.encode_chat(conv), 32)
        assert out.text.strip()

    # Second turn: the history (system + turn 1) is served from the prefix cache.
    hits_before = llm.stats()["prefix_hit_tokens"]
    conv2 = convs[0] + [{"role": "assistant", "content": first[0].text},
                        {"role": "user", "content": "And of Germany?"}]
    second = llm.chat(conv2, params)[0]
    prompt2 = llm.encode_chat(conv2)
    assert list(second.token_ids) == hf_greedy(hf, prompt2, 32)
    # every token turn 1 computed (its prompt and all but its last sampled token) that the
    # re-rendered history repeats is a hit, below block granularity too
    computed = list(first[0].prompt_token_ids) + list(first[0].token_ids[:-1])
    same = next((i for i, (a, b) in enumerate(zip(computed, prompt2)) if a != b), len(computed))
    assert same > 16 and second.num_cached_tokens == min(same, len(prompt2) - 1)
    assert llm.stats()["prefix_hit_tokens"] > hits_before


@pytest.mark.slow
def test_default_model_plain_prompts_match_transformers(default_llm, hf_reference):
    # as above: the two best logits >= 0.14 apart along these 24-token continuations
    hf = hf_reference(default_llm.model_info["path"])
    prompts = ["The three laws of thermodynamics are", "def fibonacci(n):", "Once upon a time"]
    outs = default_llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY))
    for p, out in zip(prompts, outs):
        assert list(out.token_ids) == hf_greedy(hf, default_llm.tokenizer.encode(p), 24, ignore_eos=True)
