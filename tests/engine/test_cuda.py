"""On a CUDA GPU the engine gives transformers' greedy tokens: tiny random models of every layout
and the default model, in float32 on the compiled Triton kernels, against transformers in float32
on the CPU (`tests/oracles.py`, the oracle of the CPU tests).

Every test here is marked `cuda`: without a GPU they are deselected (tests/conftest.py), never
skipped into a green run; `benchmarks/gpu_check.sh` runs them on a GPU machine. Pools are kept
small: the CUDA default (85% of free memory) would hold most of the card for each LLM.
"""
from __future__ import annotations

import pytest

from chatpager import LLM, SamplingParams
from chatpager.engine.model.tiny_model import ARCHS
from tests.engine.test_engine_vs_transformers import assert_matches_hf, random_prompts
from tests.oracles import hf_greedy

pytestmark = pytest.mark.cuda

POOL = 256 * 2**20
EXACT = dict(device="cuda", attention="triton", dtype="float32", quantization="none", kv_cache_memory=POOL)


def check_on_cuda(llm: LLM) -> None:
    info = llm.model_info
    assert info["device"].startswith("cuda") and info["attention"] == "triton"  # compiled, not "(interpreter)"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_layout_matches_transformers_on_cuda(arch, tiny_model_factory, hf_reference):
    path = tiny_model_factory(arch)
    llm = LLM(model=path, max_num_batched_tokens=32, **EXACT)  # the 90-token prompt prefills in 3 chunks
    check_on_cuda(llm)
    hf = hf_reference(path)
    prompts = random_prompts(1, [1, 7, 33, 90])
    assert_matches_hf(llm, hf, prompts, max_tokens=20)
    followup = [prompts[3] + random_prompts(2, [9])[0]]  # its first blocks are prefix-cache hits now
    assert_matches_hf(llm, hf, followup, max_tokens=12)
    assert llm.stats()["prefix_hit_tokens"] > 0


@pytest.mark.slow
def test_default_model_chats_match_transformers_on_cuda(hf_reference):
    llm = LLM(**EXACT)
    check_on_cuda(llm)
    hf = hf_reference(llm.model_info["path"])
    system = {"role": "system", "content": "You are a concise, friendly assistant. Answer in one or two sentences."}
    questions = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?"]
    convs = [[system, {"role": "user", "content": q}] for q in questions]
    params = SamplingParams(max_tokens=32, temperature=0.0)
    first = llm.chat(convs, params)
    for conv, out in zip(convs, first):
        assert list(out.token_ids) == hf_greedy(hf, llm.encode_chat(conv), 32)
        assert out.text.strip()

    # Second turn: the history (system + turn 1) is served from the prefix cache.
    conv2 = convs[0] + [{"role": "assistant", "content": first[0].text},
                        {"role": "user", "content": "And of Germany?"}]
    second = llm.chat(conv2, params)[0]
    assert list(second.token_ids) == hf_greedy(hf, llm.encode_chat(conv2), 32)
    assert second.num_cached_tokens > 16


def test_cuda_defaults_are_triton_in_bfloat16(tiny_llama):
    llm = LLM(model=tiny_llama, kv_cache_memory=POOL)
    check_on_cuda(llm)
    assert llm.model_info["dtype"] == "bfloat16" and llm.model_info["quantization"] == "none"
    outs = llm.generate(random_prompts(3, [5, 40]), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [8, 8]
