"""Turns: sessions' requests to the engine, from the user's send to the reply stored.

`Turns` turns what the user asks for (send, regenerate, fork, stop, pick) into EngineLoop
commands, and engine events into session state; messages are written through `Sessions`.
Invariants:
- A session has at most one live turn (`Session.request_id`); a turn's request ids (its
  parallel samples included) map back to the session through `_turns`.
- A turn always ends: with the engine's finished output, a rejection, or an engine failure;
  its reply is then appended (or, for a regeneration, offered to pick from).
- A turn rejected because the history no longer fits the model's context or the KV pool is
  sent again without the oldest exchange (the system prompt stays), until it fits or only
  the latest user message is left; the stored messages are kept whole.
- A plain turn's reply (not a regeneration's, whose old reply stays stored until settled) is
  checkpointed at most every `checkpoint_interval` seconds while it streams, so a killed
  process loses at most that much of it.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from chatpager.engine.loop.client import EngineFailed, EngineLoop, Rejected
from chatpager.engine.outputs import CacheSnapshot, RequestOutput
from chatpager.engine.sampling_params import BeamSearchParams, SamplingParams
from chatpager.tui.session import GENERATING, IDLE, Message, PREEMPTED, QUEUED, Session
from chatpager.tui.sessions import require_idle, Sessions, UserError


@dataclass(frozen=True, slots=True)
class Notice:
    session_id: str
    message: str
    severity: str = "error"


@dataclass(slots=True)
class Changes:
    """What a batch of engine events changed."""

    sessions: set[str] = field(default_factory=set)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (session id, reason)
    notices: list[Notice] = field(default_factory=list)


@dataclass(slots=True)
class _Turn:
    session_id: str
    request_ids: tuple[str, ...]  # the main request first, then parallel samples
    params: SamplingParams | None = None  # None: submitted elsewhere, not ours to resend
    regenerate: bool = False
    fork_of: str | None = None  # a branch of this session's live reply
    beams: bool = False  # a beam search: its beams, best first, arrive in its output's samples
    done: set[str] = field(default_factory=set)


class Turns:
    def __init__(
        self,
        sessions: Sessions,
        engine: EngineLoop,
        params: SamplingParams,
        checkpoint_interval: float = 1.0,
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.params = params
        self.checkpoint_interval = checkpoint_interval
        self._turns: dict[str, _Turn] = {}  # by every request id of the turn
        self._serial = itertools.count(1)
        self._last_checkpoint = time.monotonic()

    # -- what the user asks for ----------------------------------------------------------------
    def send(self, session: Session, text: str, params: SamplingParams | None = None) -> None:
        require_idle(session)
        self.sessions.append(session, Message("user", text))
        self._submit(session, params or self.params_for(session))

    def regenerate(self, session: Session, n: int = 1) -> None:
        """Generate the last reply again; with n > 1, n alternatives to pick from."""
        self._take_last_reply(session)
        self._submit(session, dataclasses.replace(self.params_for(session), n=n), regenerate=True)

    def beam(self, session: Session, k: int) -> None:
        """Search for the last reply with `k` beams; the beams, best first, are the alternatives."""
        if "lora" in session.settings:
            raise UserError(f"beam search runs on the base model only; {session.title} uses LoRA adapter "
                            f"{session.settings['lora']!r} (/lora none to leave it)")
        self._take_last_reply(session)
        params = BeamSearchParams(beam_width=k, max_tokens=self.params_for(session).max_tokens)
        self._submit(session, params, regenerate=True)

    @staticmethod
    def _take_last_reply(session: Session) -> None:
        """Set the last reply aside until a regeneration settles (kept if none is picked)."""
        require_idle(session)
        if not session.messages:
            raise UserError("there is nothing to regenerate yet")
        if session.messages[-1].role == "assistant":
            session.replaced = session.messages.pop().content
            session.revision += 1

    def params_for(self, session: Session) -> SamplingParams:
        """The app's sampling parameters with the session's own settings (/set) applied."""
        return dataclasses.replace(self.params, **session.settings)

    def contiguous_need(self, snapshot: CacheSnapshot | None) -> tuple[int, int] | None:
        """For this app's sequences now in the pool: (blocks they hold, blocks a contiguous
        allocator would reserve, each sequence's prompt plus max_tokens); None if there are none."""
        if snapshot is None:
            return None
        held: set[int] = set()
        reserved = 0
        for view in snapshot.sequences:
            turn = self._turns.get(view.request_id)
            if turn is None or turn.params is None or not view.held_blocks:
                continue
            held.update(view.held_blocks)
            reserved += -(-(view.num_prompt_tokens + turn.params.max_tokens) // snapshot.block_size)
        return (len(held), reserved) if held else None

    def fork(self, source: Session) -> Session:
        """A new session with the same history; a reply being generated is forked too, and
        both continue from the same blocks."""
        session = self.sessions.copy(source)
        if source.request_id is not None and not self._turns[source.request_id].regenerate:
            request_id = self._new_request_id(session)
            self._begin(session, _Turn(session.id, (request_id,), self.params, fork_of=source.id))
            session.reply = source.reply
            session.state = source.state
            self.engine.fork(source.request_id, request_id)
        return session

    def follow(self, session: Session, request_id: str) -> None:
        """Make a request submitted elsewhere (a remote tenant's) this idle session's turn:
        its outputs then update the session as a local turn's do."""
        self._begin(session, _Turn(session.id, (request_id,), params=None))

    def stop(self, session: Session) -> None:
        """Abort the reply; what was generated is kept, its blocks are freed at once."""
        if session.request_id is None:
            return
        for request_id in self._turns[session.request_id].request_ids:
            self.engine.abort(request_id)

    def pick(self, session: Session, index: int | None) -> None:
        """Settle a regeneration with alternative `index`, or None to keep the old reply."""
        reply = session.replaced if index is None else session.choices[index]
        session.choices = []
        session.replaced = None
        if reply:
            session.messages.append(Message("assistant", reply))
        session.revision += 1
        self.sessions.rewrite(session)

    def delete(self, session: Session) -> None:
        """Stop the session's turn, forget it, and delete the session."""
        if session.request_id is not None:
            self.stop(session)
            self._forget(self._turns[session.request_id])
        self.sessions.delete(session)

    def close(self) -> None:
        """On quitting: keep what the replies still running have generated, as if stopped."""
        for session in self.sessions.values():
            if session.request_id is not None and session.stored and session.reply:
                turn = self._turns[session.request_id]
                self._end(session, turn, "abort", Changes())

    # -- engine events -------------------------------------------------------------------------
    def apply(self, events: Iterable[object]) -> Changes:
        changes = Changes()
        for event in events:
            if isinstance(event, RequestOutput):
                self._on_output(event, changes)
            elif isinstance(event, Rejected):
                self._fail(event.request_id, event.message, changes, too_long=event.too_long)
            elif isinstance(event, EngineFailed):
                for request_id in event.request_ids:
                    self._fail(request_id, event.message, changes)
        if time.monotonic() - self._last_checkpoint >= self.checkpoint_interval:
            self._checkpoint()
        return changes

    def observe(self, snapshot: CacheSnapshot) -> None:
        """Update sessions' states from the engine's view of their sequences."""
        status = {view.request_id: view for view in snapshot.sequences}
        for session in self.sessions.values():
            view = status.get(session.request_id) if session.request_id else None
            if session.request_id is None:
                session.state = IDLE
            elif view is None:
                if not session.reply:
                    session.state = QUEUED
            elif view.status == "running":
                session.state = GENERATING
            elif view.status == "swapped" or view.num_tokens > view.num_prompt_tokens:
                session.state = PREEMPTED
            else:
                session.state = QUEUED

    # -- internals -----------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        self._last_checkpoint = time.monotonic()
        streaming = {turn.session_id for turn in self._turns.values()
                     if not turn.regenerate and len(turn.request_ids) == 1}
        self.sessions.checkpoint([self.sessions[i] for i in streaming if i in self.sessions])

    def _new_request_id(self, session: Session) -> str:
        return f"{session.id}-{next(self._serial)}"

    def _submit(self, session: Session, params: SamplingParams, regenerate: bool = False) -> None:
        request_id = self._new_request_id(session)
        samples = tuple(f"{request_id}.{i}" for i in range(1, getattr(params, "n", 1)))
        beams = hasattr(params, "beam_width")
        self._begin(session, _Turn(session.id, (request_id, *samples), params, regenerate, beams=beams))
        self.engine.submit(request_id, session.chat(), params)

    def _begin(self, session: Session, turn: _Turn) -> None:
        session.request_id = turn.request_ids[0]
        session.reply = ""
        session.samples = {}
        session.error = None
        session.state = QUEUED
        for request_id in turn.request_ids:
            self._turns[request_id] = turn

    def _session_of(self, request_id: str) -> tuple[_Turn, Session] | None:
        turn = self._turns.get(request_id)
        session = self.sessions.get(turn.session_id) if turn else None
        return None if session is None else (turn, session)

    def _on_output(self, output: RequestOutput, changes: Changes) -> None:
        found = self._session_of(output.request_id)
        if found is None:
            return
        turn, session = found
        changes.sessions.add(session.id)
        session.samples[output.request_id] = output.text
        if output.request_id == session.request_id:
            session.reply = output.text
            session.tokens = len(output.prompt_token_ids) + len(output.token_ids)
            session.cached_tokens = output.num_cached_tokens
            if not output.finished:
                session.state = GENERATING
        if output.error:
            session.error = output.error
            changes.notices.append(Notice(session.id, output.error))
        if output.finished and turn.beams:
            for beam in output.samples:
                session.samples[beam.request_id] = beam.text
        if output.finished:
            turn.done.add(output.request_id)
            if len(turn.done) == len(turn.request_ids):
                self._end(session, turn, output.finish_reason or "stop", changes)

    def _fail(self, request_id: str, message: str, changes: Changes, too_long: bool = False) -> None:
        found = self._session_of(request_id)
        if found is None:
            return
        turn, session = found
        changes.sessions.add(session.id)
        if turn.params and not turn.fork_of and too_long and session.drop_oldest_turn():
            self._forget(turn)
            self._submit(session, turn.params, turn.regenerate)
            dropped = session.window
            changes.notices.append(Notice(
                session.id, f"The history no longer fits the context: the oldest {dropped} "
                f"messages are no longer sent (the system prompt is kept).", "warning"))
            return
        source = self.sessions.get(turn.fork_of or "")
        if source is not None and not source.busy:
            # The source's turn ended before the branch was made: branch the reply it added.
            # Without one (it ended empty or failed), its last message is the user's: no reply.
            added = source.messages[len(session.messages):]
            if [m.role for m in added] == ["assistant"]:
                session.samples[request_id] = added[0].content
                message = ""
            else:
                message = "the reply being forked had ended with no text"
        if message:
            session.error = message
            changes.notices.append(Notice(session.id, message))
        self._end(session, turn, "error", changes)

    def _forget(self, turn: _Turn) -> None:
        for request_id in turn.request_ids:
            self._turns.pop(request_id, None)

    def _end(self, session: Session, turn: _Turn, reason: str, changes: Changes) -> None:
        self._forget(turn)
        texts = [session.samples.get(request_id, "") for request_id in turn.request_ids]
        if turn.beams:  # the beams, best first (an aborted search has none)
            texts = [text for key, text in session.samples.items() if key not in turn.request_ids]
        session.request_id = None
        session.reply = ""
        session.samples = {}
        session.state = IDLE
        changes.finished.append((session.id, reason))
        if len(turn.request_ids) > 1 or turn.beams:
            session.choices = [text for text in texts if text]
            if not session.choices:
                self.pick(session, None)
        elif turn.regenerate:
            session.choices = [texts[0]] if texts[0] else []
            self.pick(session, 0 if texts[0] else None)
        elif texts[0]:
            self.sessions.append(session, Message("assistant", texts[0]))
        self.sessions.end_checkpoint(session)

