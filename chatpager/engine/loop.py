"""EngineLoop: the one thread that owns an LLM and its engine, for a UI to drive.

Invariants:
- Only the loop's thread touches the LLM (its construction included) and its engine; other
  threads talk to it through `submit` / `abort` / `fork` / `close`, which only enqueue.
- Commands are applied in the order they were made, between engine steps. Commands made
  before the model has loaded wait in the queue; if loading fails, each submit is answered
  with `Rejected`.
- The loop steps while the engine has unfinished work and blocks on the queue otherwise
  (no busy waiting).
- Events are coalesced: at most one pending `RequestOutput` per request, the latest. Its
  `text` and `token_ids` are cumulative, so a reader that drains rarely loses nothing but
  `new_token_ids` of the steps it skipped. Other events are kept in order.
- `wake()` is called after events are added; a reader drains with `drain()`.
- `snapshot` is the latest CacheSnapshot: replaced at most every `snapshot_interval`
  seconds while stepping, and whenever the engine has just gone idle or applied a command.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from chatpager.engine.outputs import CacheSnapshot, RequestOutput
from chatpager.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from chatpager.llm import LLM

ProgressFn = Callable[[str, "float | None"], None]


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
class Rejected:
    """A command about `request_id` could not be applied (bad prompt, pool too small...)."""

    request_id: str
    message: str


@dataclass(frozen=True, slots=True)
class EngineFailed:
    """A step raised: `request_ids` (every live request) have been dropped. If the engine
    cannot even be stepped to release them, it is given up and later submits are rejected."""

    message: str
    request_ids: tuple[str, ...]


Event = Union[LoadProgress, Loaded, LoadFailed, Rejected, EngineFailed, RequestOutput]


@dataclass(frozen=True, slots=True)
class _Submit:
    request_id: str
    messages: tuple[Mapping[str, str], ...]
    params: SamplingParams


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
        wake: Callable[[], None] = lambda: None,
        snapshot_interval: float = 0.1,
    ) -> None:
        """`load(progress)` builds the LLM; it runs on the loop's thread."""
        self._load = load
        self._wake = wake
        self._snapshot_interval = snapshot_interval
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, Any], Event] = {}
        self._serial = itertools.count()
        self._thread = threading.Thread(target=self._run, name="chatpager-engine", daemon=True)
        self.snapshot: CacheSnapshot | None = None
        self.model_info: dict | None = None
        self._unusable = "the model is not loaded"  # why submits are rejected without an LLM

    # -- called from any thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(
        self, request_id: str, messages: Sequence[Mapping[str, str]], params: SamplingParams
    ) -> None:
        """Queue a chat request; its outputs arrive as `RequestOutput` events."""
        self._commands.put(_Submit(request_id, tuple(dict(m) for m in messages), params))

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

    def drain(self) -> list[Event]:
        """Take every pending event, oldest first."""
        with self._lock:
            events = list(self._pending.values())
            self._pending.clear()
        return events

    # -- the loop's thread -----------------------------------------------------------------
    def _publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        with self._lock:
            for event in events:
                if isinstance(event, RequestOutput):
                    key = ("output", event.request_id)
                else:
                    key = ("event", next(self._serial))
                self._pending[key] = event
        self._wake()

    def _load_llm(self) -> LLM | None:
        def progress(stage: str, fraction: float | None) -> None:
            self._publish([LoadProgress(stage, fraction)])

        try:
            llm = self._load(progress)
        except Exception as error:  # any load failure is reported, the loop lives on
            self._unusable = f"the model failed to load: {error}"
            self._publish([LoadFailed(f"{type(error).__name__}: {error}")])
            return None
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
        if llm is None:
            self._publish([Rejected(command.request_id, self._unusable)])
            return
        try:
            if isinstance(command, _Submit):
                prompt = llm.encode_chat(list(command.messages))
                llm.engine.add_request(prompt, command.params, request_id=command.request_id)
                live.add(command.request_id)
                live.update(f"{command.request_id}.{i}" for i in range(1, command.params.n))
            else:
                llm.engine.fork(command.request_id, command.new_request_id, command.params)
                live.add(command.new_request_id)
        except Exception as error:  # a bad request must not take the loop down
            request_id = getattr(command, "new_request_id", command.request_id)
            self._publish([Rejected(request_id, str(error))])

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
