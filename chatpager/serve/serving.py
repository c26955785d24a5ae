"""What chat and completions share: an OpenAI request as one engine request group.

`Generation` submits through the bridge, waits for the engine to accept (so a refusal is
still an HTTP status, not a broken stream), then turns the group's cumulative outputs into
per-choice text deltas, a usage record and latency metrics. Choice i is the engine's
request "X" (i = 0) or its parallel sample "X.i".

Invariant: streamed deltas concatenate to the final text. With stop strings the engine may
cut text it has already reported (the stop string spans two steps), so while a choice runs
its last `longest stop - 1` characters are held back.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from fastapi import Request, Response
from pydantic import BaseModel

from chatpager.engine.loop.client import Accepted, EngineFailed, Event, Prompt, Rejected
from chatpager.engine.outputs import RequestOutput
from chatpager.engine.sampling_params import SamplingParams
from chatpager.serve.auth import Tenant
from chatpager.serve.bridge import EngineBridge, QueueFull, RemoteRequest
from chatpager.serve.config import ServeConfig
from chatpager.serve.errors import APIError
from chatpager.serve.metrics import ServerMetrics
from chatpager.serve.protocol import PromptTokensDetails, SamplingRequest, Usage

UNTIL_CONTEXT = 1 << 30  # no max_tokens: generate until a stop, or the context is full
DISCONNECT_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class ServeContext:
    """What every endpoint serves with."""

    bridge: EngineBridge
    metrics: ServerMetrics
    config: ServeConfig

    @property
    def model_name(self) -> str | None:
        info = self.bridge.engine.model_info
        return self.config.served_model_name or (info["name"] if info else None)

    @property
    def lora_adapters(self) -> list[str]:
        info = self.bridge.engine.model_info
        return list(info.get("lora_adapters", ())) if info else []

    def check_model(self, name: str) -> str | None:
        """The LoRA adapter a request's `model` names: None for the base model; an unknown
        name is a 404, as OpenAI answers."""
        expected = self.model_name
        if expected is None or name == expected:
            return None
        if name in self.lora_adapters:
            return name
        known = ", ".join(repr(m) for m in [expected, *self.lora_adapters])
        raise APIError(404, f"the model {name!r} does not exist; this server has {known}",
                       "model_not_found", "model")

    def cache_salt(self, tenant: Tenant, requested: str | None) -> str | None:
        """With isolation, the tenant's name salts every block key; a request's own salt
        narrows further (it never widens: another tenant cannot name its way in)."""
        if not self.config.isolate_tenants:
            return requested
        return tenant.name if requested is None else f"{tenant.name}\x00{requested}"

    async def start(self, req: SamplingRequest, tenant: Tenant, prompt: Prompt,
                    params: SamplingParams, messages: tuple[tuple[str, str], ...],
                    prefix: str) -> Generation:
        """Submit, and return once the engine has accepted the request (or raise why not)."""
        lora = self.check_model(req.model)
        if lora is not None:
            params = replace(params, lora=lora)
        tag = RemoteRequest(tenant.name, req.model, messages)
        gen = Generation(self.bridge, self.metrics, new_id(prefix), prompt, params,
                         self.cache_salt(tenant, req.cache_salt), tag)
        try:
            await gen.accepted()
        except BaseException:
            gen.close()
            raise
        return gen


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sampling_params(req: SamplingRequest, max_tokens: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "invalid_value", "stop")
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            max_tokens=max_tokens or UNTIL_CONTEXT,
            stop=stop, seed=req.seed, n=req.n, ignore_eos=req.ignore_eos,
        )
    except ValueError as exc:  # the protocol's bounds should catch these first
        raise APIError(400, str(exc), "invalid_value") from None


def check_fields(req: SamplingRequest) -> None:
    unsupported = req.unsupported_fields()
    if unsupported:
        raise APIError(400, f"unsupported parameter(s): {', '.join(unsupported)}",
                       "unsupported_parameter", unsupported[0])


@dataclass(slots=True)
class Choice:
    index: int
    text: str = ""
    sent: int = 0  # characters already streamed
    tokens: int = 0
    finish_reason: str | None = None
    reported: bool = False  # its last delta (with the finish reason) has been handed out


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    text: str
    finish_reason: str | None  # set once, on the choice's last delta


class Generation:
    def __init__(self, bridge: EngineBridge, metrics: ServerMetrics, request_id: str,
                 prompt: Prompt, params: SamplingParams, cache_salt: str | None,
                 tag: RemoteRequest) -> None:
        self.request_id = request_id
        self.metrics = metrics
        self.arrival = time.monotonic()
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        try:
            self.stream = bridge.open(request_id, prompt, params, cache_salt=cache_salt, tag=tag)
        except QueueFull as exc:
            raise APIError(429, str(exc), "rate_limit_exceeded") from None
        self.choices = {rid: Choice(i) for i, rid in enumerate(self.stream.ids)}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self._last_token_at: float | None = None
        self._recorded = False

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices.values())

    async def accepted(self) -> None:
        """Wait until the engine has taken the request (Accepted comes before any output)."""
        event = await self.stream.queue.get()
        if isinstance(event, Rejected):
            status = 400 if event.bad_request else 503
            raise APIError(status, event.message, "invalid_prompt" if status == 400 else None,
                           "messages" if status == 400 else None)
        if not isinstance(event, Accepted):
            self._apply(event)

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Each batch of new text (and finish reasons) until every choice has finished."""
        while not self.finished:
            for event in await self.stream.next_events():
                self._apply(event)
            batch = [d for c in self.choices.values() if (d := self._delta(c)) is not None]
            if batch:
                yield batch

    async def complete(self) -> None:
        async for _ in self.deltas():
            pass

    def usage(self) -> Usage:
        completion = sum(c.tokens for c in self.choices.values())
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    def close(self) -> None:
        """Abort what still runs (the client went away) and record the request's figures."""
        self.stream.close()
        if self.finished and not self._recorded:
            self._recorded = True
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
            self.metrics.cached_tokens.inc(self.cached_tokens)
            self.metrics.generation_tokens.inc(sum(c.tokens for c in self.choices.values()))
            for choice in self.choices.values():
                self.metrics.requests.labels(choice.finish_reason).inc()

    # -- internals --------------------------------------------------------------------------
    def _apply(self, event: Event) -> None:
        if isinstance(event, EngineFailed):
            raise APIError(500, f"the engine failed: {event.message}", "engine_error")
        if not isinstance(event, RequestOutput):
            return
        if event.error or event.finish_reason == "error":
            raise APIError(500, f"the engine failed on this request: {event.error}", "engine_error")
        choice = self.choices[event.request_id]
        if event.request_id == self.request_id:
            self.prompt_tokens = len(event.prompt_token_ids)
            self.cached_tokens = event.num_cached_tokens
            self._time_tokens(len(event.token_ids) - choice.tokens)
        choice.text = event.text
        choice.tokens = len(event.token_ids)
        if event.finished:
            choice.finish_reason = event.finish_reason

    def _time_tokens(self, new: int) -> None:
        if new <= 0:
            return
        now = time.monotonic()
        if self._last_token_at is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:  # tokens that arrived together share the gap since the last ones
            for _ in range(new):
                self.metrics.itl.observe((now - self._last_token_at) / new)
        self._last_token_at = now

    def _delta(self, choice: Choice) -> ChoiceDelta | None:
        if choice.reported:
            return None
        done = choice.reported = choice.finish_reason is not None
        visible = len(choice.text) if done else max(choice.sent, len(choice.text) - self._holdback)
        text = choice.text[choice.sent:visible]
        choice.sent = visible
        if not text and not done:
            return None
        return ChoiceDelta(choice.index, text, choice.finish_reason)


async def unless_disconnected(request: Request, work: Awaitable) -> bool:
    """Run `work` to its end (True), or cancel it if the client goes away first (False)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return False
        task.result()
        return True
    finally:
        if not task.done():
            task.cancel()


def sse(payload: BaseModel) -> str:
    """One server-sent event, as OpenAI streams them."""
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


def json_response(payload: BaseModel) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")


SSE_DONE = "data: [DONE]\n\n"
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, the logs do


async def streamed(gen: Generation, chunks: Callable[[list[ChoiceDelta]], BaseModel],
                   usage_chunk: Callable[[Usage], BaseModel] | None,
                   first: BaseModel | None = None) -> AsyncIterator[str]:
    """The SSE body of a streamed generation; an engine failure mid-stream becomes an error
    event. Closing it early (the client went away) aborts the generation."""
    try:
        if first is not None:
            yield sse(first)
        async for batch in gen.deltas():
            yield sse(chunks(batch))
        if usage_chunk is not None:
            yield sse(usage_chunk(gen.usage()))
    except APIError as exc:
        yield sse(exc.body())
    finally:
        gen.close()
    yield SSE_DONE


async def completed(request: Request, gen: Generation) -> bool:
    """Run a generation to its end unless the client leaves (then it is aborted)."""
    try:
        return await unless_disconnected(request, gen.complete())
    finally:
        gen.close()
