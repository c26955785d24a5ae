"""Remote tenants: requests made to `chatpager --serve`'s HTTP server, as read-only sessions.

The server submits to the app's own EngineLoop, so its requests reach the app's main channel:
an `Accepted` event tagged with a `RemoteRequest` (tenant, model, messages), then ordinary
outputs, which `Turns` applies as it does for local sessions. Invariants:
- One client's multi-turn chat is one session: a request joins the idle session of its
  tenant whose conversation so far (messages and the reply it got) begins the request's
  messages, the longest such; otherwise it starts a new session.
- Remote sessions are never stored and are read-only (`Session.remote` is set): they can be
  watched, stopped, forked into a local session or deleted, not typed into.
- At most `max_sessions` remote sessions are kept: the least recently used idle ones go first
  (never the one on screen).
"""
from __future__ import annotations

from collections.abc import Iterable

from chatpager.engine.loop.client import Accepted
from chatpager.serve.bridge import RemoteRequest
from chatpager.tui.session import Message, Session
from chatpager.tui.sessions import Sessions
from chatpager.tui.turns import Turns

MAX_SESSIONS = 64
COMPLETION = "prompt"  # the role a completion request's prompt carries in its tag


class RemoteTenants:
    def __init__(self, sessions: Sessions, turns: Turns, max_sessions: int = MAX_SESSIONS) -> None:
        self.sessions = sessions
        self.turns = turns
        self.max_sessions = max_sessions
        self._recent: list[str] = []  # remote session ids, least recently used first
        self._serial: dict[str, int] = {}  # tenant -> sessions made so far
        self._completion: dict[str, bool] = {}  # session id -> made by /v1/completions

    def apply(self, events: Iterable[object], keep: str | None = None) -> None:
        """Give each newly accepted remote request its session and turn (before `Turns`
        applies the same events, so their outputs find the turn)."""
        for event in events:
            if isinstance(event, Accepted) and isinstance(event.tag, RemoteRequest):
                session = self._session_for(event.tag)
                self.turns.follow(session, event.request_id)
                self._recent.remove(session.id)
                self._recent.append(session.id)
        self._trim(keep)

    def _session_for(self, request: RemoteRequest) -> Session:
        system, messages = _split(request.messages)
        completion = request.messages[0][0] == COMPLETION
        candidates = [s for s in self._idle(request.tenant)
                      if self._completion[s.id] == completion
                      and _continues(s, system, messages, completion)]
        best = max(candidates, key=lambda s: len(s.messages), default=None)
        if best is None:
            best = self._create(request, completion)
        best.system, best.messages = system, messages
        best.revision += 1  # the chat view redraws from the messages the client sent
        return best

    def _idle(self, tenant: str) -> list[Session]:
        sessions = (self.sessions.get(i) for i in self._recent)
        return [s for s in sessions if s is not None and s.remote == tenant and not s.busy]

    def _create(self, request: RemoteRequest, completion: bool) -> Session:
        serial = self._serial[request.tenant] = self._serial.get(request.tenant, 0) + 1
        title = f"⇄ {request.tenant}" + (f" #{serial}" if serial > 1 else "")
        any_prompt = next(iter(self.sessions.prompts))  # its system prompt is the client's, below
        session = self.sessions.create(any_prompt, title, stored=False)
        session.prompt_name = request.model  # the sidebar's second word: what it talks to
        session.remote = request.tenant
        self._recent.append(session.id)
        self._completion[session.id] = completion
        return session

    def _trim(self, keep: str | None) -> None:
        self._recent = [i for i in self._recent if i in self.sessions]  # the user deletes too
        for session_id in list(self._recent):
            if len(self._recent) <= self.max_sessions:
                break
            session = self.sessions[session_id]
            if session.id != keep and not session.busy:
                self.turns.delete(session)
                self._recent.remove(session_id)
        self._completion = {i: self._completion[i] for i in self._recent}


def _split(pairs: tuple[tuple[str, str], ...]) -> tuple[str, list[Message]]:
    """The system prompt (the leading system messages) and the rest as chat messages."""
    system = [content for role, content in pairs if role == "system"]
    rest = [Message("user" if role == COMPLETION else role, content)
            for role, content in pairs if role != "system"]
    return "\n\n".join(system), rest


def _continues(session: Session, system: str, messages: list[Message], completion: bool) -> bool:
    """Whether `messages` carry on `session`'s conversation, its last reply included. A
    completion carries one on when its prompt begins with the earlier prompt and completion."""
    if session.system != system or not session.messages:
        return False
    if completion:
        said = "".join(m.content for m in session.messages)
        return len(messages) == 1 and messages[0].content.startswith(said)
    return len(session.messages) < len(messages) and all(
        old.role == new.role and old.content.strip() == new.content.strip()
        for old, new in zip(session.messages, messages))


def connect_hint(url: str, model: str) -> str:
    """How to reach the server, for the help screen: curl and the openai client."""
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}'
    return (f"Serving {url}/v1 — remote tenants appear in the sidebar (⇄).\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
            f"  openai.OpenAI(base_url=\"{url}/v1\", api_key=\"-\").chat.completions.create("
            f"model=\"{model}\", messages=[...])")
