"""chatpager serve through the official openai client, on a tiny random-weight model:
the wire format, streaming, parallel samples, stop strings, token-id prompts, metrics."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatpager.serve.config import ServeConfig
from tests.serve.support import serving, wait_for

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def srv(tiny_llama):
    with serving(tiny_llama, ServeConfig(port=0), num_blocks=64) as running:
        yield running


def test_models_lists_the_loaded_model(client, srv):
    models = client.models.list().data
    assert [m.id for m in models] == [srv.engine.model_info["name"]]
    assert models[0].object == "model"


def test_chat_completion_has_openai_shape_and_usage(client, served_model, srv):
    reply = client.chat.completions.create(model=served_model, messages=CHAT, max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.message.content
    usage = reply.usage
    assert usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + 6
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_concatenates_to_the_same_reply_and_ends_with_usage(client, served_model):
    kwargs = dict(model=served_model, messages=CHAT, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_stream_ends_with_done(srv, served_model):
    body = {"model": served_model, "messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", srv.base_url + "/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_n_parallel_samples_come_back_as_indexed_choices(client, served_model):
    reply = client.chat.completions.create(model=served_model, messages=CHAT, n=3, max_tokens=5,
                                           temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 15
    assert len({c.message.content for c in reply.choices}) > 1  # seeded differently per sample
    stream = client.chat.completions.create(model=served_model, messages=CHAT, n=2, max_tokens=4,
                                            stream=True, extra_body={"ignore_eos": True})
    ended = [choice.index for chunk in stream for choice in chunk.choices if choice.finish_reason]
    assert sorted(ended) == [0, 1]


def test_stop_string_cuts_the_reply_in_both_modes(client, served_model):
    kwargs = dict(model=served_model, messages=CHAT, max_tokens=40, temperature=0,
                  extra_body={"ignore_eos": True})
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = free[10:12]  # two characters from the middle of the greedy reply
    cut = client.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == free[:free.index(stop)]
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(**kwargs, stop=stop, stream=True)
                       if c.choices)
    assert streamed == cut.message.content


def test_completions_take_token_ids_and_text(client, served_model):
    ids = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    by_ids = client.completions.create(model=served_model, prompt=ids, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.object == "text_completion" and by_ids.id.startswith("cmpl-")
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.usage.completion_tokens == 5
    streamed = list(client.completions.create(model=served_model, prompt=ids, max_tokens=5, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == by_ids.choices[0].text
    by_text = client.completions.create(model=served_model, prompt="Hello, world", max_tokens=2)
    assert by_text.usage.prompt_tokens > 0 and by_text.choices[0].finish_reason in ("stop", "length")


def test_a_repeated_prompt_reports_cached_tokens(client, served_model):
    messages = [{"role": "user", "content": "A fairly long question about paged attention " * 3}]
    first = client.chat.completions.create(model=served_model, messages=messages, max_tokens=2)
    again = client.chat.completions.create(model=served_model, messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens > 32
    # every full block of the prompt but the last token's is served from the cache
    assert again.usage.prompt_tokens_details.cached_tokens >= (first.usage.prompt_tokens - 1) // 16 * 16


def test_metrics_parse_and_their_counters_move(srv, client, served_model):
    before = srv.metrics()
    assert before["chatpager:kv_cache_usage_perc"] >= 0
    assert sum(before[f"chatpager:kv_blocks{{state={s}}}"] for s in ("used", "cached", "free")) == 64
    # The server hears of tokens in coalesced batches, and times gaps only after its first: the
    # engine holds after the prefill's token until the server has heard it alone.
    ttft = "chatpager:time_to_first_token_seconds_count"
    with ThreadPoolExecutor(1) as pool, srv.holding():  # released before the pool waits
        reply = pool.submit(client.chat.completions.create, model=served_model, messages=CHAT,
                            max_tokens=4, extra_body={"ignore_eos": True})
        wait_for(lambda: srv.engine.snapshot.sequences)  # submitted, and held: not stepped
        srv.step(1)  # the prefill, and its one token
        wait_for(lambda: srv.metrics()[ttft] == before[ttft] + 1)
    assert reply.result(timeout=30).usage.completion_tokens == 4
    after = wait_for(lambda: (m := srv.metrics())["chatpager:prefix_cache_queries_total"]
                     > before["chatpager:prefix_cache_queries_total"] and m)
    assert after["chatpager:generation_tokens_total"] == before["chatpager:generation_tokens_total"] + 4
    assert after["chatpager:prompt_tokens_total"] > before["chatpager:prompt_tokens_total"]
    assert after[ttft] == before[ttft] + 1
    # one gap for each token after the first, however the last three were batched
    assert after["chatpager:inter_token_latency_seconds_count"] == \
        before["chatpager:inter_token_latency_seconds_count"] + 3
    assert after["chatpager:request_success_total{finished_reason=length}"] >= 1
    for name in ("num_requests_running", "num_requests_waiting", "num_preemptions_total",
                 "prefix_cache_hits_total", "evictions_total", "cow_copies_total", "sharing_ratio"):
        assert f"chatpager:{name}" in after


def test_health(srv):
    response = httpx.get(srv.server.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
