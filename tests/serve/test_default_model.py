"""chatpager serve on the default model, where behaviour must be real: greedy replies over
HTTP equal `LLM.chat`'s, and a conversation's second turn is served from the prefix cache."""
from __future__ import annotations

import pytest

from chatpager import SamplingParams
from chatpager.serve.config import ServeConfig
from tests.serve.support import serving

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "You are a concise assistant."}


@pytest.fixture(scope="module")
def srv():
    # built as the `default_llm` reference is (the exact float32 path), so replies can match
    with serving(None, ServeConfig(port=0), quantization="none", dtype="float32") as running:
        yield running


def test_greedy_chat_over_http_equals_llm_chat(srv, default_llm):
    client = srv.client()
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct"
    messages = [SYSTEM, {"role": "user", "content": "Name three colours of the rainbow."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    [local] = default_llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))
    assert reply.choices[0].message.content == local.text
    assert reply.usage.prompt_tokens == len(local.prompt_token_ids)
    assert reply.usage.completion_tokens == len(local.token_ids)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices)
    assert streamed == local.text


def test_the_second_turn_reports_cached_tokens(srv):
    client = srv.client()
    model = client.models.list().data[0].id
    messages = [SYSTEM, {"role": "user", "content": "What is a KV cache, in one sentence?"}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And why page it?"}]
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # at least the first turn's prompt, but for its last partly filled block, came from the cache
    assert first.usage.prompt_tokens // 16 * 16 - 16 <= cached < second.usage.prompt_tokens
