"""The core of an EngineLoop: the loop that owns an LLM. It builds it, applies commands between
steps, steps while there is work and reports what happens. Where it runs is its host's choice:
a thread of the client's process, or a process of its own (`process.CoreProcess`).

Invariants:
- Only the core touches the LLM, its construction included.
- Commands are applied in the order they were made, between engine steps. Commands made
  before the model has loaded wait; if loading fails, each submit is answered with `Rejected`.
- It steps while the engine has unfinished work and no hold stops it, and blocks on its
  commands otherwise.
- A hold (for tests and demos): after `Hold(serial, steps)` it takes at most `steps` more engine
  steps (counted as they are taken: without work it waits, budget intact), then holds. Held, it
  applies commands and answers them as ever, but takes no step: a submit is accepted or
  rejected and waits, a fork shares its blocks, an abort frees its blocks at once, yet every
  output (an abort's finished one too) comes with a step. On reaching the hold it reports a
  snapshot, then `Held(serial)`, once per Hold. `Release`, or a later Hold's budget, lets it
  step again.
- Every submit is answered first by `Accepted` or by `Rejected`; an accepted request then
  reports `RequestOutput`s until one is `finished` (or an `EngineFailed` names it).
- `Report.state` is called before the `Loaded` / `LoadFailed` event it explains, and again
  when the engine is given up; `Report.snapshot` at most every `snapshot_interval` seconds
  while stepping, and whenever the engine has just gone idle or held, or applied a command.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from chatpager.engine.loop.protocol import (Abort, Accepted, Close, Command, EngineFailed, Event, Fork, group_ids,
                                            Held, Hold, Loaded, LoadFailed, LoadProgress, ProgressFn, Rejected,
                                            Release, Submit)
from chatpager.engine.outputs import CacheSnapshot
from chatpager.errors import ChatpagerError, PromptTooLong

if TYPE_CHECKING:
    from chatpager.engine.llm import LLM


class Report(Protocol):
    """Where a core's news goes: its host hands it to the client."""

    def events(self, events: Sequence[Event]) -> None: ...

    def state(self, model_info: dict | None, unusable: str | None) -> None: ...

    def snapshot(self, snapshot: CacheSnapshot) -> None: ...


def load_llm(kwargs: dict, progress: ProgressFn, threads: int | None = None) -> LLM:
    """`LLM(**kwargs)`, on `threads` CPU threads if given (torch's are per process): a loader that
    pickles, so a process host can send it to the core's process."""
    import torch

    from chatpager.engine.llm import LLM

    if threads is not None:
        torch.set_num_threads(threads)
    return LLM(**kwargs, progress=progress)


class EngineCore:
    def __init__(self, load: Callable[[ProgressFn], LLM], commands: queue.SimpleQueue, report: Report,
                 snapshot_interval: float) -> None:
        self._load = load
        self._commands = commands
        self._report = report
        self._snapshot_interval = snapshot_interval
        self._unusable: str | None = "the model is not loaded"  # why submits are rejected
        self._live: set[str] = set()  # requests not yet finished
        self._budget: int | None = None  # steps left before the hold; None: no hold
        self._unanswered: int | None = None  # the Hold to answer with Held once its budget is spent

    def run(self) -> None:
        llm = self._load_llm()
        last_snapshot = time.monotonic()
        while True:
            commands = self._take_commands(block=not self._may_step(llm))
            for command in commands:
                if isinstance(command, Close):
                    return
                self._apply(llm, command)
            if llm is None:
                self._answer_hold()
                continue
            if self._may_step(llm):
                if not self._step(llm):
                    llm = None
                    continue
                if self._budget is not None:
                    self._budget -= 1
            now = time.monotonic()
            idle = not self._may_step(llm)  # no work, or held
            if idle or commands or now - last_snapshot >= self._snapshot_interval:
                self._report.snapshot(llm.engine.snapshot())
                last_snapshot = now
            self._answer_hold()

    def _may_step(self, llm: LLM | None) -> bool:
        """Whether the engine has work and no hold stops it."""
        return llm is not None and self._budget != 0 and llm.engine.has_unfinished()

    def _answer_hold(self) -> None:
        if self._budget == 0 and self._unanswered is not None:
            self._report.events([Held(self._unanswered)])
            self._unanswered = None

    def _take_commands(self, block: bool) -> list[Command]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _load_llm(self) -> LLM | None:
        def progress(stage: str, fraction: float | None) -> None:
            self._report.events([LoadProgress(stage, fraction)])

        try:
            llm = self._load(progress)
        except Exception as error:  # any load failure is reported, the loop lives on
            self._unusable = f"the model failed to load: {error}"
            self._report.state(None, self._unusable)
            self._report.events([LoadFailed(f"{type(error).__name__}: {error}")])
            return None
        self._unusable = None
        model_info = dict(llm.model_info)
        self._report.state(model_info, None)
        self._report.snapshot(llm.engine.snapshot())
        self._report.events([Loaded(model_info)])
        return llm

    def _apply(self, llm: LLM | None, command: Command) -> None:
        if isinstance(command, Hold):
            self._budget, self._unanswered = command.steps, command.serial
            return
        if isinstance(command, Release):
            self._budget = self._unanswered = None
            return
        if isinstance(command, Abort):
            if llm is not None:
                llm.engine.abort(command.request_id)  # a finished or unknown id is a no-op
            return
        if llm is None:
            self._reject(command, self._unusable or "", bad_request=False)
            return
        try:
            if isinstance(command, Submit):
                self._add_request(llm, command)
                self._live.update(group_ids(command.request_id, command.params))
            else:
                llm.engine.fork(command.request_id, command.new_request_id, command.params)
                self._live.add(command.new_request_id)
        except Exception as error:  # a bad request must not take the loop down
            self._reject(command, str(error), isinstance(error, (ChatpagerError, ValueError)),
                         too_long=isinstance(error, PromptTooLong))

    def _reject(self, command: Submit | Fork, message: str, bad_request: bool, too_long: bool = False) -> None:
        request_id = command.new_request_id if isinstance(command, Fork) else command.request_id
        self._report.events([Rejected(request_id, message, bad_request, too_long)])

    def _add_request(self, llm: LLM, command: Submit) -> None:
        prompt = llm.encode_chat(list(command.prompt)) if command.chat else command.prompt
        if not isinstance(prompt, str):
            prompt = list(prompt)
        if hasattr(command.params, "beam_width"):  # a beam search: one output, when it ends
            llm.engine.add_beam_search(prompt, command.params, request_id=command.request_id,
                                       cache_salt=command.cache_salt)
        else:
            llm.engine.add_request(prompt, command.params, request_id=command.request_id,
                                   cache_salt=command.cache_salt)
        self._report.events([Accepted(command.request_id)])

    def _step(self, llm: LLM) -> bool:
        """One engine step; False when the engine broke beyond recovery."""
        try:
            outputs = llm.engine.step()
        except Exception as error:
            dropped = tuple(sorted(self._live))
            self._live.clear()
            self._report.events([EngineFailed(f"{type(error).__name__}: {error}", dropped)])
            try:
                for request_id in dropped:
                    llm.engine.abort(request_id)
                llm.engine.step()  # releases the aborted requests' blocks
            except Exception as second:
                self._unusable = f"the engine failed: {second}"
                self._report.state(dict(llm.model_info), self._unusable)
                return False
            return True
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
        self._report.events(outputs)
        return True


class CoreThread:
    """The host that runs a core on a thread of the client's process."""

    def __init__(self, load: Callable[[ProgressFn], LLM], report: Report, snapshot_interval: float) -> None:
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        core = EngineCore(load, self.commands, report, snapshot_interval)
        self._thread = threading.Thread(target=core.run, name="chatpager-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, command: Command) -> bool:
        self.commands.put(command)
        return True

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float) -> None:
        """Stop after the commands already sent (a model still loading is not interrupted: the
        thread is a daemon and dies with the process)."""
        self.commands.put(Close())
        if self._thread.is_alive():
            self._thread.join(timeout)
