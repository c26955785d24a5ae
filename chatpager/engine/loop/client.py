"""EngineLoop: an LLM and its engine behind a command queue, for its clients (the TUI, the HTTP
server) to drive from any thread. The engine itself runs in a core (`core.EngineCore`) on a
thread of this process, or in a process of its own (`process=True`, `process.CoreProcess`):
the same commands, events and invariants either way.

Invariants:
- Only the core touches the LLM (its construction included) and its engine; other threads
  talk to it through `submit` / `abort` / `fork` / `hold` / `release` / `close`, which only
  enqueue.
- Commands are applied in the order they were made, between engine steps. Commands made
  before the model has loaded wait in the queue; if loading fails, each submit is answered
  with `Rejected`. The core steps while the engine has unfinished work and blocks on its
  commands otherwise (no busy waiting).
- Every submit is answered first by `Accepted` (carrying the submitter's `tag`) or by
  `Rejected`; an accepted request then reports `RequestOutput`s until one is `finished`
  (or an `EngineFailed` names it). Parallel samples of request X report as "X.1", "X.2"...
  A beam search (`BeamSearchParams`) reports once, when it ends, its beams in `samples`.
  If the core's process dies, an `EngineFailed` names every unfinished request, and later
  submits are rejected.
- Events go to channels (`Channel`), each with its own pending events and wake-up call:
  - the main channel (the constructor's `wake`, read with `drain()`) sees every event:
    loading, and every request whoever submitted it. The TUI is the main channel and so
    shows requests made over HTTP beside its own.
  - a channel from `subscribe(wake)` sees only the requests submitted with `reply_to=` it
    (their samples included), and of an `EngineFailed` only its own request ids. Its
    requests stay its own until they finish; forks of them belong to the main channel.
  Channels and tags stay in this process: the client keeps them by request id.
- Within a channel, events are coalesced: at most one pending `RequestOutput` per request,
  the latest. Its `text` and `token_ids` are cumulative, so a reader that drains rarely
  loses nothing but `new_token_ids` of the steps it skipped. Other events are kept in order,
  and an event about a request is never drained after a later one about the same request.
- A channel's `wake()` is called (on the core's thread, or the reader thread of a core's
  process: it must only schedule work) after events are added to it; its reader drains with
  `drain()`.
- `snapshot` is the latest CacheSnapshot: replaced at most every `snapshot_interval`
  seconds while stepping, and whenever the engine has just gone idle or held, or applied a
  command.
- For tests and demos, `hold(steps)` stops the engine's steps after `steps` more, and
  `release()` lets it run again (the core's invariants say what a held core does). `held` is
  True from when the core holds for the latest `hold()` until `release()`; the `Held` that
  tells it reaches no channel.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatpager.engine.loop.core import CoreThread
from chatpager.engine.loop.protocol import (Abort, Accepted, EngineFailed, Event, Fork, group_ids, Held, Hold, Loaded,
                                            LoadFailed, LoadProgress, ProgressFn, Prompt, Rejected, Release, Submit)
from chatpager.engine.outputs import CacheSnapshot, RequestOutput
from chatpager.engine.sampling_params import BeamSearchParams, SamplingParams
from chatpager.errors import ChatpagerError

if TYPE_CHECKING:
    from chatpager.engine.llm import LLM
    from chatpager.engine.loop.process import CoreProcess

__all__ = ["Accepted", "Channel", "EngineFailed", "EngineLoop", "Event", "Loaded", "LoadFailed", "LoadProgress",
           "ProgressFn", "Prompt", "Rejected"]


class Channel:
    """One client's events: its own coalesced pending events and wake-up call. Thread-safe."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, Any], Event] = {}
        self._serial = itertools.count()

    def drain(self) -> list[Event]:
        """Take every pending event, oldest first."""
        with self._lock:
            events = list(self._pending.values())
            self._pending.clear()
        return events

    def _post(self, events: Sequence[Event]) -> None:
        with self._lock:
            for event in events:
                if isinstance(event, RequestOutput):
                    key = ("output", event.request_id)
                    # An output replacing a pending one keeps that one's place in the order.
                else:
                    key = ("event", next(self._serial))
                self._pending[key] = event
        self._wake()


class EngineLoop:
    def __init__(
        self,
        load: Callable[[ProgressFn], LLM],
        wake: Callable[[], None] | None = None,
        snapshot_interval: float = 0.1,
        *,
        process: bool = False,
        output_path: Path | None = None,
    ) -> None:
        """`load(progress)` builds the LLM; it runs in the core. `wake` makes the main channel
        (see the module docstring); without it, only subscribed channels get events.
        `process`: run the core in a process of its own (`load` must then pickle, e.g.
        `functools.partial(core.load_llm, kwargs)`); its log records are handled by this
        process's loggers, its stdout and stderr go to `output_path` if given."""
        self._main = Channel(wake) if wake is not None else None
        self._lock = threading.Lock()  # the routing records below: submitters' threads vs the core's reports
        self._owners: dict[str, Channel] = {}  # request id -> its subscribed channel
        self._tags: dict[str, object] = {}  # request id -> its submitter's tag, until Accepted
        self._groups: dict[str, list[str]] = {}  # request id -> it and its samples' ids, until answered
        self._live: set[str] = set()  # requests submitted or forked and not yet finished
        self.snapshot: CacheSnapshot | None = None
        self.model_info: dict | None = None
        self._unusable: str | None = "the model is not loaded"  # why the core rejects submits
        self._settled = threading.Event()  # the model loaded, or will not
        self._hold_lock = threading.Lock()  # a hold's serial and its command go out in one order
        self._holds = itertools.count(1)
        self._hold_asked: int | None = None  # the serial of the latest hold(), until release()
        self._hold_reached = 0  # the serial of the latest Hold the core reports holding for

        def make_host() -> CoreThread | CoreProcess:
            report = _Reports(self)
            if process:
                from chatpager.engine.loop.process import CoreProcess

                return CoreProcess(load, report, snapshot_interval, self._lost, output_path)
            return CoreThread(load, report, snapshot_interval)

        self._make_host = make_host
        self._host = make_host()

    # -- called from any thread ------------------------------------------------------------
    def start(self) -> None:
        self._host.start()

    def subscribe(self, wake: Callable[[], None]) -> Channel:
        """A channel for the requests submitted with `reply_to=` it."""
        return Channel(wake)

    def submit(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | BeamSearchParams,
        *,
        cache_salt: str | None = None,
        tag: object = None,
        reply_to: Channel | None = None,
    ) -> None:
        """Queue a request: chat messages, text or token ids. It is answered by `Accepted` or
        `Rejected`, then `RequestOutput` events; on `reply_to`'s channel if given (and on the
        main channel in any case). `cache_salt` keeps its prefix-cache blocks apart from those
        of requests with another salt."""
        if isinstance(prompt, str):
            command = Submit(request_id, prompt, False, params, cache_salt)
        elif prompt and isinstance(prompt[0], Mapping):
            command = Submit(request_id, tuple(dict(m) for m in prompt), True, params, cache_salt)
        else:
            command = Submit(request_id, tuple(int(t) for t in prompt), False, params, cache_salt)
        ids = group_ids(request_id, params)
        with self._lock:
            self._groups[request_id] = ids
            self._live.update(ids)
            if tag is not None:
                self._tags[request_id] = tag
            if reply_to is not None:
                self._owners.update(dict.fromkeys(ids, reply_to))
        if not self._host.send(command):
            self._publish([Rejected(request_id, self._unusable or "", bad_request=False)])

    def abort(self, request_id: str) -> None:
        self._host.send(Abort(request_id))

    def fork(
        self, request_id: str, new_request_id: str, params: SamplingParams | None = None
    ) -> None:
        """Branch a live request; the branch shares every block of the original."""
        with self._lock:
            self._live.add(new_request_id)
        if not self._host.send(Fork(request_id, new_request_id, params)):
            self._publish([Rejected(new_request_id, self._unusable or "", bad_request=False)])

    def hold(self, steps: int = 0) -> None:
        """For tests and demos, not for serving: let the core take at most `steps` more engine
        steps, then hold. Held, it still applies and answers commands (submit, abort, fork) and
        replaces `snapshot`, but generates nothing, so a state that lasts as long as the engine
        takes stays put to be looked at. `held` says when it holds. While held, `hold(n)` takes
        up to n more steps and holds again (a step: one prefill chunk, or one token, for every
        running sequence). An abort's finished output waits for the next step, like any output."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        with self._hold_lock:
            self._hold_asked = next(self._holds)
            self._host.send(Hold(self._hold_asked, steps))

    def release(self) -> None:
        """End a hold: the core steps whenever there is work again."""
        with self._hold_lock:
            self._hold_asked = None
            self._host.send(Release())

    @property
    def held(self) -> bool:
        """The core holds for the latest `hold()`: every command before it is applied, its steps
        are taken, and `snapshot` shows the engine as it stopped (and as later commands change
        it). False once `release()` is called."""
        return self._hold_asked is not None and self._hold_reached == self._hold_asked

    def restart(self) -> None:
        """Start a new core after this one stopped (its process died, or its engine was given
        up): it loads the model afresh, with an empty cache. Raises ChatpagerError while the
        engine is ready, or still loading."""
        if self.ready or (self.is_alive() and not self._settled.is_set()):
            raise ChatpagerError("the engine is running: nothing to restart")
        self._host.close(timeout=1.0)
        with self._lock:
            dropped = tuple(sorted(self._live))
        if dropped:  # whatever the old core had not answered
            self._publish([EngineFailed("the engine restarted", dropped)])
        self.snapshot, self.model_info, self._unusable = None, None, "the model is not loaded"
        self._settled = threading.Event()
        with self._hold_lock:
            self._hold_asked = None  # a new core starts unheld
        self._host = self._make_host()
        self._host.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the core after the commands already queued."""
        self._host.close(timeout)

    def is_alive(self) -> bool:
        return self._host.is_alive()

    @property
    def ready(self) -> bool:
        """The model has loaded and the engine can take requests."""
        return self.model_info is not None and self._unusable is None and self.is_alive()

    def wait_loaded(self, timeout: float | None = None) -> dict:
        """Block until the model has loaded; its model_info. Raises ChatpagerError if it
        failed to (or the core's process died), TimeoutError after `timeout` seconds."""
        if not self._settled.wait(timeout):
            raise TimeoutError(f"the model did not load in {timeout} s")
        if self.model_info is None:
            raise ChatpagerError(self._unusable or "the model failed to load")
        return self.model_info

    def drain(self) -> list[Event]:
        """Take every pending event of the main channel, oldest first."""
        return self._main.drain() if self._main is not None else []

    # -- the core's reports (on the core's thread, or the reader thread of its process) -------
    def _publish(self, events: Sequence[Event]) -> None:
        """Hand each event to the main channel and to its request's subscribed channel."""
        routed: dict[Channel, list[Event]] = defaultdict(list)
        with self._lock:
            for event in events:
                for channel, routed_event in self._route(event):
                    routed[channel].append(routed_event)
        for channel, batch in routed.items():
            channel._post(batch)

    def _route(self, event: Event) -> list[tuple[Channel, Event]]:
        """Where `event` goes, as what; updates the routing records (under the lock)."""
        if isinstance(event, EngineFailed):
            mine: dict[Channel, list[str]] = defaultdict(list)
            for request_id in event.request_ids:
                self._live.discard(request_id)
                if (owner := self._owners.pop(request_id, None)) is not None:
                    mine[owner].append(request_id)
            return [*self._to_main(event), *((o, EngineFailed(event.message, tuple(ids))) for o, ids in mine.items())]
        if isinstance(event, Held):
            self._hold_reached = event.serial
            return []
        request_id = getattr(event, "request_id", None)
        if isinstance(event, Accepted):
            self._groups.pop(request_id, None)
            event = dataclasses.replace(event, tag=self._tags.pop(request_id, None))
        owner = self._owners.get(request_id) if request_id is not None else None
        if isinstance(event, Rejected):
            self._tags.pop(request_id, None)
            for sample_id in self._groups.pop(request_id, [request_id]):
                self._live.discard(sample_id)
                self._owners.pop(sample_id, None)
        elif isinstance(event, RequestOutput) and event.finished:
            self._live.discard(request_id)
            self._owners.pop(request_id, None)
        return [*self._to_main(event), *([(owner, event)] if owner is not None else [])]

    def _to_main(self, event: Event) -> list[tuple[Channel, Event]]:
        return [(self._main, event)] if self._main is not None else []

    def _lost(self, why: str) -> None:
        """The core's process ended untold: every unfinished request fails, later ones are rejected."""
        self._unusable = why
        self._settled.set()
        with self._lock:
            dropped = tuple(sorted(self._live))
        self._publish([EngineFailed(why, dropped)])


class _Reports:
    """The client's side of the core's `Report`."""

    def __init__(self, loop: EngineLoop) -> None:
        self._loop = loop

    def events(self, events: Sequence[Event]) -> None:
        self._loop._publish(events)

    def state(self, model_info: dict | None, unusable: str | None) -> None:
        self._loop.model_info, self._loop._unusable = model_info, unusable
        self._loop._settled.set()

    def snapshot(self, snapshot: CacheSnapshot) -> None:
        self._loop.snapshot = snapshot
