"""The bridge between the HTTP side (asyncio) and the EngineLoop.

Invariants:
- The HTTP side only submits and aborts through the EngineLoop and reads its snapshot; it
  hears back on one channel subscribed for this server (`EngineLoop.subscribe`).
- The channel's wake-up runs on the EngineLoop's reporting thread and only schedules
  `_dispatch` on the asyncio loop (`call_soon_threadsafe`), at most one pending at a time;
  `_dispatch` hands each event to its request group's queue. Outputs are cumulative, so a
  consumer that lags behind reads the latest and loses nothing.
- A request group (a request and its parallel samples "X.1", "X.2"...) has one queue from
  `open` until its stream is closed or its members have finished; closing a stream whose
  members have not all finished aborts them at once (the client has gone: its blocks are
  freed on the next step).
- `waiting` counts groups submitted that have neither produced an output nor been refused;
  `open` raises `QueueFull` when it has reached `max_waiting`.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from chatpager.engine.loop.client import Channel, EngineFailed, EngineLoop, Event, Prompt, Rejected
from chatpager.engine.outputs import RequestOutput
from chatpager.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RemoteRequest:
    """The tag a server request carries to the main channel: who sent what (the TUI shows it)."""

    tenant: str
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, content); a completion is one ("prompt", text)


class QueueFull(Exception):
    pass


class RequestStream:
    """One request group's events, read by the coroutine serving it."""

    def __init__(self, bridge: EngineBridge, request_id: str, n: int) -> None:
        self.request_id = request_id
        self.ids = [request_id] + [f"{request_id}.{i}" for i in range(1, n)]
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.unfinished = set(self.ids)
        self._bridge = bridge

    async def next_events(self) -> list[Event]:
        """Every event queued, waiting for the first."""
        events = [await self.queue.get()]
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events

    def close(self) -> None:
        """Forget the group; abort what is still running (idempotent)."""
        for request_id in self.ids:
            if request_id in self.unfinished:
                self._bridge.engine.abort(request_id)
        self.unfinished.clear()
        self._bridge._forget(self)


class EngineBridge:
    def __init__(self, engine: EngineLoop, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._streams: dict[str, RequestStream] = {}  # by every request id of the group
        self._waiting: set[str] = set()  # group ids
        self._channel: Channel | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._scheduled = False

    def attach(self) -> None:
        """Bind to the running asyncio loop (the server's startup)."""
        self._aloop = asyncio.get_running_loop()
        self._channel = self.engine.subscribe(self._wake)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def open(self, request_id: str, prompt: Prompt, params: SamplingParams, *,
             cache_salt: str | None, tag: RemoteRequest) -> RequestStream:
        if self._channel is None:
            raise RuntimeError("EngineBridge.attach() was not called")
        if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self._waiting)} requests are already waiting for the engine "
                            f"(--max-waiting {self.max_waiting}); retry later")
        stream = RequestStream(self, request_id, params.n)
        for member in stream.ids:
            self._streams[member] = stream
        self._waiting.add(request_id)
        self.engine.submit(request_id, prompt, params, cache_salt=cache_salt, tag=tag,
                           reply_to=self._channel)
        return stream

    def _forget(self, stream: RequestStream) -> None:
        for member in stream.ids:
            if self._streams.get(member) is stream:
                del self._streams[member]
        self._waiting.discard(stream.request_id)

    # -- the EngineLoop's reporting thread -----------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._aloop.call_soon_threadsafe(self._dispatch)
        except RuntimeError:  # the asyncio loop has closed: the server is shutting down
            pass

    # -- the asyncio loop ---------------------------------------------------------------------
    def _dispatch(self) -> None:
        with self._lock:
            self._scheduled = False
        for event in self._channel.drain():
            if isinstance(event, EngineFailed):
                for request_id in event.request_ids:
                    self._deliver(request_id, event)
            elif hasattr(event, "request_id"):
                self._deliver(event.request_id, event)

    def _deliver(self, request_id: str, event: Event) -> None:
        stream = self._streams.get(request_id)
        if stream is None:  # closed already (the client went away)
            return
        if isinstance(event, (RequestOutput, Rejected, EngineFailed)):
            self._waiting.discard(stream.request_id)
        finished = isinstance(event, (Rejected, EngineFailed)) or (
            isinstance(event, RequestOutput) and event.finished)
        if finished:
            members = stream.ids if isinstance(event, Rejected) else [request_id]
            stream.unfinished.difference_update(members)
            for member in members:  # a stream its reader never closes still leaves nothing
                self._streams.pop(member, None)
        stream.queue.put_nowait(event)
