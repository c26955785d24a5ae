"""chatpager serve's failures: each error class with OpenAI's status and shape, the server
serving on afterwards; clients that leave have their requests aborted and blocks freed."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from chatpager.serve.config import ServeConfig
from tests.serve.support import serving, wait_for

CHAT = [{"role": "user", "content": "Say hi."}]
ENDLESS = {"max_tokens": 5000, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def srv(tiny_model_factory):
    # a long context over a smaller pool: a prompt can be too long for either
    model = tiny_model_factory("llama", max_position_embeddings=16384)
    with serving(model, ServeConfig(port=0), num_blocks=512) as running:
        yield running


def assert_openai_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(word in error["message"] for word in words), error["message"]
    return error


def post(srv, path: str, **kwargs) -> httpx.Response:
    return httpx.post(srv.base_url + path, timeout=30, **kwargs)


def test_malformed_json_and_missing_fields_are_400(srv, served_model):
    bad_json = post(srv, "/chat/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert_openai_error(bad_json, 400)
    missing = assert_openai_error(post(srv, "/chat/completions", json={"model": served_model}), 400)
    assert missing["param"] == "messages"
    out_of_range = post(srv, "/chat/completions",
                        json={"model": served_model, "messages": CHAT, "temperature": 5})
    assert assert_openai_error(out_of_range, 400)["param"] == "temperature"
    unsupported = post(srv, "/chat/completions", json={"model": served_model, "messages": CHAT, "logprobs": True})
    assert assert_openai_error(unsupported, 400, "logprobs")["code"] == "unsupported_parameter"
    defaults = {"frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}}
    assert post(srv, "/chat/completions", json={"model": served_model, "messages": CHAT, "max_tokens": 1,
                                                **defaults}).status_code == 200
    assert_openai_error(post(srv, "/completions", json={"model": served_model, "prompt": ["a", "b"]}), 400,
                        "one prompt")


def test_prompts_too_long_for_the_context_or_the_pool_are_400_with_the_numbers(client, served_model):
    with pytest.raises(openai.BadRequestError) as context:
        client.completions.create(model=served_model, prompt=[65] * 17000, max_tokens=1)
    assert "17000" in str(context.value) and "16384" in str(context.value)
    with pytest.raises(openai.BadRequestError) as pool:
        client.chat.completions.create(model=served_model, max_tokens=1,
                                       messages=[{"role": "user", "content": "x" * 9000}])
    assert "blocks" in str(pool.value) and "512" in str(pool.value)


def test_unknown_model_and_route_are_404(srv, client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert unknown.value.body["code"] == "model_not_found"
    assert_openai_error(httpx.get(srv.base_url + "/nowhere"), 404)


def test_an_engine_failure_is_500_and_other_requests_keep_being_served(srv, client, served_model):
    runner = srv.llm[0].engine.runner
    run = runner.run

    def fail_once(batch):
        runner.run = run  # the next step is healthy again
        raise RuntimeError("simulated device fault")

    runner.run = fail_once
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=served_model, messages=CHAT, max_tokens=4)
    assert "simulated device fault" in str(failed.value)
    reply = client.chat.completions.create(model=served_model, messages=CHAT, max_tokens=4,
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 4


STEPS_TO_NOTICE = 100  # two or three writes, in practice


def test_a_client_leaving_mid_stream_has_its_request_aborted_and_blocks_freed(srv, served_model):
    srv.wait_idle()
    body = {"model": served_model, "messages": CHAT, "stream": True, "max_tokens": 5000, "ignore_eos": True}
    with srv.holding(steps=8):  # a prefill and a few tokens, then held: the request cannot end by itself
        with httpx.stream("POST", srv.base_url + "/chat/completions", json=body) as response:
            lines = response.iter_lines()
            while '"content":"' not in next(lines).replace('"content":""', ""):
                pass
            wait_for(lambda: srv.engine.held)
            steps = srv.engine.snapshot.stats["steps"]
            assert [v.num_tokens - v.num_prompt_tokens for v in srv.engine.snapshot.sequences] == [8]
        # a streaming server hears that its client left when it next writes: step by step, at a
        # pace it keeps up with, the request is aborted long before it could end (5000 tokens)
        while srv.engine.snapshot.sequences:
            assert srv.step(1) - steps < STEPS_TO_NOTICE, "the request was not aborted"
            time.sleep(0.02)
    stats = srv.wait_idle(timeout=10)
    assert stats["cached_blocks"] > 0  # its blocks are free, their content still hittable


def test_a_non_streaming_client_that_times_out_is_aborted_too(srv, client, served_model):
    srv.wait_idle()
    impatient = srv.client(timeout=0.5)
    with srv.holding():  # nothing is generated: the client times out, whatever the engine's speed
        steps = srv.step()
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model=served_model, messages=CHAT, **ENDLESS)
        wait_for(lambda: not srv.engine.snapshot.sequences)  # the server aborted it
        assert srv.engine.snapshot.stats["steps"] == steps
    srv.wait_idle(timeout=10)


def test_queue_full_is_429_and_waiting_requests_are_served_once_the_model_loads(tiny_llama):
    gate = threading.Event()
    config = ServeConfig(port=0, max_waiting=1)
    with serving(tiny_llama, config, wait=False, load_gate=gate, num_blocks=64) as srv:
        assert_openai_error(httpx.get(srv.server.url + "/health"), 503, "loading")
        bridge = srv.server.server.config.app.state.ctx.bridge
        results = []
        first = threading.Thread(target=lambda: results.append(srv.client().chat.completions.create(
            model="any", messages=CHAT, max_tokens=3)))
        first.start()
        wait_for(lambda: bridge.waiting == 1)
        with pytest.raises(openai.RateLimitError) as full:
            srv.client().chat.completions.create(model="any", messages=CHAT, max_tokens=3)
        assert full.value.status_code == 429 and "--max-waiting 1" in str(full.value)
        gate.set()
        first.join(30)
        assert results and results[0].choices[0].finish_reason in ("stop", "length")
        assert httpx.get(srv.server.url + "/health").status_code == 200
