"""The engine on the Triton attention backend gives the same greedy tokens as on the torch one.

Without a GPU the Triton kernels run under the interpreter, so the models are tiny and the
generations short; the batches still mix whole prompts, chunked prefills, decodes and
prefix-cache hits (prefill on a cached prefix).
"""
from __future__ import annotations

import random

import pytest

from chatpager import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def random_prompts(seed: int, lengths: list[int], vocab: int = 250) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch, overrides, block_size", [
    ("llama", {}, 16),  # 4 query heads / 2 KV heads, head_dim 16
    ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2}, 4),  # GQA 4, head_dim 8
    ("qwen3", {}, 8),  # q/k norm, head_dim 16
])
def test_triton_backend_generates_the_same_greedy_tokens(arch, overrides, block_size, tiny_model_factory):
    path = tiny_model_factory(arch, **overrides)
    settings = dict(model=path, block_size=block_size, max_num_batched_tokens=24)  # the 37-token prompt is chunked
    reference = LLM(attention="torch", **settings)
    triton = LLM(attention="triton", **settings)
    assert triton.model_info["attention"].startswith("triton")

    prompts = random_prompts(7, [1, 11, 37])
    followup = [prompts[2] + random_prompts(8, [5])[0]]  # its first blocks are now prefix-cache hits
    for batch in (prompts, followup):
        expected = [list(o.token_ids) for o in reference.generate(batch, GREEDY)]
        assert [list(o.token_ids) for o in triton.generate(batch, GREEDY)] == expected
    assert triton.stats()["prefix_hit_tokens"] > 0
