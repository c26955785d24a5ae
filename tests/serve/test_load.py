"""A bounded load test: 32 concurrent streaming clients × 3 turns on a shared system prompt
finish without error, leak no block, and show sharing in /metrics while they run (the engine
held until every first turn is in, then stepped until the prompts share blocks)."""
from __future__ import annotations

import asyncio
import time

import httpx

from chatpager.serve.config import ServeConfig
from tests.serve.support import serving

CLIENTS, TURNS = 32, 3
SYSTEM = ("You are the help desk of a small library. Answer in one short sentence, politely, "
          "and never invent opening hours; if unsure, say so and suggest the front desk. ") * 2


async def converse(client, model: str, k: int) -> list:
    messages = [{"role": "system", "content": SYSTEM}]
    usages = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"Client {k}, question {turn}: any news?"})
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0.7, seed=k, stream=True,
            stream_options={"include_usage": True})
        reply, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                reply += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        messages.append({"role": "assistant", "content": reply})
        usages.append(usage)
    return usages


async def shared_blocks_once_stepped(srv) -> float:
    """With the engine held: once every first turn is in, step it until the requests admitted
    share their system prompt's blocks; /metrics's shared blocks then."""
    engine = srv.engine
    deadline = time.monotonic() + 60

    async def until(condition) -> None:
        while not condition():
            assert time.monotonic() < deadline, "the engine did not share the system prompt's blocks"
            await asyncio.sleep(0.005)

    await until(lambda: len(engine.snapshot.sequences) == CLIENTS)  # a snapshot comes with each submit
    while not engine.snapshot.stats["shared_blocks"]:
        engine.hold(1)
        await until(lambda: engine.held)
    async with httpx.AsyncClient() as http:
        text = (await http.get(srv.server.url + "/metrics")).text
    [line] = [line for line in text.splitlines() if line.startswith("chatpager:shared_blocks ")]
    return float(line.split()[1])


def test_32_streaming_clients_x_3_turns(tiny_llama):
    with serving(tiny_llama, ServeConfig(port=0), num_blocks=1024) as srv:
        client = srv.async_client()
        model = srv.client().models.list().data[0].id

        async def run() -> tuple[list, float]:
            conversations = asyncio.gather(*(converse(client, model, k) for k in range(CLIENTS)))
            try:
                shared = await shared_blocks_once_stepped(srv)
            finally:
                srv.engine.release()
            return await conversations, shared

        srv.engine.hold()
        results, shared = asyncio.run(run())
        usages = [u for per_client in results for u in per_client]
        assert len(usages) == CLIENTS * TURNS and all(u.completion_tokens >= 1 for u in usages)
        hits = [[u.prompt_tokens_details.cached_tokens > 0 for u in per_client] for per_client in results]
        assert all(all(turns[1:]) for turns in hits)  # a client's later turns reuse its history
        assert sum(turns[0] for turns in hits) >= CLIENTS // 2  # first turns: the system prompt
        stats = srv.wait_idle()
        assert stats["used_blocks"] == 0  # no leak: every block free or cached
        assert stats["free_blocks"] == stats["num_blocks"]
        metrics = srv.metrics()
        assert metrics["chatpager:prefix_cache_hits_total"] > 0.5 * metrics["chatpager:prefix_cache_queries_total"]
        assert shared > 0  # concurrent requests held the system prompt's blocks together
        assert metrics["chatpager:request_success_total{finished_reason=length}"] + \
            metrics.get("chatpager:request_success_total{finished_reason=stop}", 0) == CLIENTS * TURNS
