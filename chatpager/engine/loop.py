"""EngineLoop: the one thread that owns an LLM and its engine, for its clients (the TUI, the
HTTP server) to drive.

Invariants:
- Only the loop's thread touches the LLM (its construction included) and its engine; other
  threads talk to it through `submit` / `abort` / `fork` / `close`, which only enqueue.
- Commands are applied in the order they were made, between engine steps. Commands made
  before the model has loaded wait in the queue; if loading fails, each submit is answered
  with `Rejected`.
- The loop steps while the engine has unfinished work and blocks on the queue otherwise
  (no busy waiting).
- Every submit is answered first by `Accepted` (carrying the submitter's `tag`) or by
  `Rejected`; an accepted request then reports `RequestOutput`s until one is `finished`
  (or an `EngineFailed` names it). Parallel samples of request X report as "X.1", "X.2"...
  A beam search (`BeamSearchParams`) reports once, when it ends, its beams in `samples`.
- Events go to channels (`Channel`), each with its own pending events and wake-up call:
  - the main channel (the constructor's `wake`, read with `drain()`) sees every event:
    loading, and every request whoever submitted it. The TUI is the main channel and so
    shows requests made over HTTP beside its own.
  - a channel from `subscribe(wake)` sees only the requests submitted with `reply_to=` it
    (their samples included), and of an `EngineFailed` only its own request ids. Its
    requests stay its own until they finish; forks of them belong to the main channel.
- Within a channel, events are coalesced: at most one pending `RequestOutput` per request,
  the latest. Its `text` and `token_ids` are cumulative, so a reader that drains rarely
  loses nothing but `new_token_ids` of the steps it skipped. Other events are kept in order,
  and an event about a request is never drained after a later one about the same request.
- A channel's `wake()` is called (on the loop's thread: it must only schedule work) after
  events are added to it; its reader drains with `drain()`.
- `snapshot` is the latest CacheSnapshot: replaced at most every `snapshot_interval`
  seconds while stepping, and whenever the engine has just gone idle or applied a command.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from chatpager.engine.outputs import CacheSnapshot, RequestOutput
from chatpager.engine.sampling_params import SamplingParams
from chatpager.errors import ChatpagerError, PromptTooLong

if TYPE_CHECKING:
    from chatpager.engine.beam_search import BeamSearchParams
    from chatpager.llm import LLM

ProgressFn = Callable[[str, "float | None"], None]
# Text, token ids, or chat messages (rendered with the model's chat template).
Prompt = Union[str, Sequence[int], Sequence[Mapping[str, str]]]


@dataclass(frozen=True, slots=True)
class LoadProgress:
    stage: str
    fraction: float | None


@dataclass(frozen=True, slots=True)
class Loaded:
    model_info: dict


@dataclass(frozen=True, slots=True)
class LoadFailed:
    message: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """`request_id` passed the engine's checks and is queued; `tag` is what its submitter
    attached (the HTTP server's tenant and messages, say), for watchers of the main channel."""

    request_id: str
    tag: object = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A command about `request_id` could not be applied (bad prompt, pool too small...)."""

    request_id: str
    message: str
    bad_request: bool = True  # the request's own fault; False: the engine could not serve it
    too_long: bool = False  # the prompt exceeds the context or the whole pool (a chat may shorten it)


@dataclass(frozen=True, slots=True)
class EngineFailed:
    """A step raised: `request_ids` (every live request) have been dropped. If the engine
    cannot even be stepped to release them, it is given up and later submits are rejected."""

    message: str
    request_ids: tuple[str, ...]


Event = Union[LoadProgress, Loaded, LoadFailed, Accepted, Rejected, EngineFailed, RequestOutput]


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


@dataclass(frozen=True, slots=True)
class _Submit:
    request_id: str
    prompt: str | tuple[int, ...] | tuple[Mapping[str, str], ...]
    chat: bool
    params: SamplingParams
    cache_salt: str | None
    tag: object
    reply_to: Channel | None


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Fork:
    request_id: str
    new_request_id: str
    params: SamplingParams | None


class _Close:
    pass


class EngineLoop:
    def __init__(
        self,
        load: Callable[[ProgressFn], LLM],
        wake: Callable[[], None] | None = None,
        snapshot_interval: float = 0.1,
    ) -> None:
        """`load(progress)` builds the LLM; it runs on the loop's thread. `wake` makes the main
        channel (see the module docstring); without it, only subscribed channels get events."""
        self._load = load
        self._main = Channel(wake) if wake is not None else None
        self._owners: dict[str, Channel] = {}  # request id -> its subscribed channel (loop thread)
        self._snapshot_interval = snapshot_interval
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="chatpager-engine", daemon=True)
        self.snapshot: CacheSnapshot | None = None
        self.model_info: dict | None = None
        self._unusable: str | None = "the model is not loaded"  # why submits are rejected

    # -- called from any thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

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
            command = _Submit(request_id, prompt, False, params, cache_salt, tag, reply_to)
        elif prompt and isinstance(prompt[0], Mapping):
            messages = tuple(dict(m) for m in prompt)
            command = _Submit(request_id, messages, True, params, cache_salt, tag, reply_to)
        else:
            ids = tuple(int(t) for t in prompt)
            command = _Submit(request_id, ids, False, params, cache_salt, tag, reply_to)
        self._commands.put(command)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def fork(
        self, request_id: str, new_request_id: str, params: SamplingParams | None = None
    ) -> None:
        """Branch a live request; the branch shares every block of the original."""
        self._commands.put(_Fork(request_id, new_request_id, params))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after the commands already queued (a model still loading is
        not interrupted: the thread is a daemon and dies with the process)."""
        self._commands.put(_Close())
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """The model has loaded and the engine can take requests."""
        return self.model_info is not None and self._unusable is None and self.is_alive()

    def drain(self) -> list[Event]:
        """Take every pending event of the main channel, oldest first."""
        return self._main.drain() if self._main is not None else []

    # -- the loop's thread -----------------------------------------------------------------
    def _publish(self, events: Sequence[Event]) -> None:
        """Hand each event to the main channel and to its request's subscribed channel."""
        routed: dict[Channel, list[Event]] = defaultdict(list)
        for event in events:
            if self._main is not None:
                routed[self._main].append(event)
            if isinstance(event, EngineFailed):
                mine: dict[Channel, list[str]] = defaultdict(list)
                for request_id in event.request_ids:
                    if (owner := self._owners.pop(request_id, None)) is not None:
                        mine[owner].append(request_id)
                for owner, ids in mine.items():
                    routed[owner].append(EngineFailed(event.message, tuple(ids)))
                continue
            request_id = getattr(event, "request_id", None)
            owner = self._owners.get(request_id) if request_id is not None else None
            if owner is not None:
                routed[owner].append(event)
                if isinstance(event, Rejected) or (isinstance(event, RequestOutput) and event.finished):
                    del self._owners[request_id]
        for channel, batch in routed.items():
            channel._post(batch)

    def _load_llm(self) -> LLM | None:
        def progress(stage: str, fraction: float | None) -> None:
            self._publish([LoadProgress(stage, fraction)])

        try:
            llm = self._load(progress)
        except Exception as error:  # any load failure is reported, the loop lives on
            self._unusable = f"the model failed to load: {error}"
            self._publish([LoadFailed(f"{type(error).__name__}: {error}")])
            return None
        self._unusable = None
        self.model_info = dict(llm.model_info)
        self.snapshot = llm.engine.snapshot()
        self._publish([Loaded(self.model_info)])
        return llm

    def _run(self) -> None:
        llm = self._load_llm()
        live: set[str] = set()
        last_snapshot = time.monotonic()
        while True:
            busy = llm is not None and llm.engine.has_unfinished()
            commands = self._take_commands(block=not busy)
            for command in commands:
                if isinstance(command, _Close):
                    return
                self._apply(llm, command, live)
            if llm is None:
                continue
            if llm.engine.has_unfinished() and not self._step(llm, live):
                llm = None
                continue
            now = time.monotonic()
            idle = not llm.engine.has_unfinished()
            if idle or commands or now - last_snapshot >= self._snapshot_interval:
                self.snapshot = llm.engine.snapshot()
                last_snapshot = now

    def _take_commands(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, llm: LLM | None, command: Any, live: set[str]) -> None:
        if isinstance(command, _Abort):
            if llm is not None:
                llm.engine.abort(command.request_id)  # a finished or unknown id is a no-op
            return
        if isinstance(command, _Submit) and command.reply_to is not None:
            for request_id in _group_ids(command.request_id, getattr(command.params, "n", 1)):
                self._owners[request_id] = command.reply_to
        if llm is None:
            self._reject(command, self._unusable or "", bad_request=False)
            return
        try:
            if isinstance(command, _Submit):
                self._add_request(llm, command)
                live.update(_group_ids(command.request_id, getattr(command.params, "n", 1)))
            else:
                llm.engine.fork(command.request_id, command.new_request_id, command.params)
                live.add(command.new_request_id)
        except Exception as error:  # a bad request must not take the loop down
            self._reject(command, str(error), isinstance(error, (ChatpagerError, ValueError)),
                         too_long=isinstance(error, PromptTooLong))

    def _reject(self, command: _Submit | _Fork, message: str, bad_request: bool, too_long: bool = False) -> None:
        if isinstance(command, _Fork):
            self._publish([Rejected(command.new_request_id, message, bad_request, too_long)])
            return
        for sample_id in _group_ids(command.request_id, getattr(command.params, "n", 1))[1:]:
            self._owners.pop(sample_id, None)  # the main id's owner goes with the Rejected
        self._publish([Rejected(command.request_id, message, bad_request, too_long)])

    def _add_request(self, llm: LLM, command: _Submit) -> None:
        prompt = llm.encode_chat(list(command.prompt)) if command.chat else command.prompt
        if not isinstance(prompt, str):
            prompt = list(prompt)
        if hasattr(command.params, "beam_width"):  # a beam search: one output, when it ends
            llm.engine.add_beam_search(prompt, command.params, request_id=command.request_id,
                                       cache_salt=command.cache_salt)
        else:
            llm.engine.add_request(prompt, command.params, request_id=command.request_id,
                                   cache_salt=command.cache_salt)
        self._publish([Accepted(command.request_id, command.tag)])

    def _step(self, llm: LLM, live: set[str]) -> bool:
        """One engine step; False when the engine broke beyond recovery."""
        try:
            outputs = llm.engine.step()
        except Exception as error:
            dropped = tuple(sorted(live))
            live.clear()
            self._publish([EngineFailed(f"{type(error).__name__}: {error}", dropped)])
            try:
                for request_id in dropped:
                    llm.engine.abort(request_id)
                llm.engine.step()  # releases the aborted requests' blocks
            except Exception as second:
                self._unusable = f"the engine failed: {second}"
                return False
            return True
        for output in outputs:
            if output.finished:
                live.discard(output.request_id)
        self._publish(outputs)
        return True


def _group_ids(request_id: str, n: int) -> list[str]:
    """A request's id and its parallel samples' ids, as the engine reports them."""
    return [request_id] + [f"{request_id}.{i}" for i in range(1, n)]
