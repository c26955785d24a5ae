"""Sessions: every chat session the app has, and the one writer of their stored part.

A `Sessions` is a mapping from session id to `Session`, in creation order. It owns the
sessions' titles, system prompts and messages, in memory and in the `Store`; turn control
(`turns.Turns`) asks it to append or rewrite messages rather than writing them itself.
Invariants:
- A stored session is in the Store from its creation on; its messages are written on every
  change (appended one by one, or rewritten in one transaction when edited).
- A session that is not stored (a swarm tenant) never touches the Store.
"""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator, Mapping

from chatpager.engine.sampling_params import SamplingParams
from chatpager.tui.session import Message, Session
from chatpager.tui.store import Store

CUSTOM_PROMPT = "custom"
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int}  # for /set


class UserError(Exception):
    """Something the user asked for that cannot be done now; the message says why."""


class Sessions(Mapping[str, Session]):
    def __init__(self, store: Store, prompts: dict[str, str]) -> None:
        self.store = store
        self.prompts = prompts
        self._by_id: dict[str, Session] = {s.id: s for s in store.load()}

    # -- the mapping ---------------------------------------------------------------------------
    def __getitem__(self, session_id: str) -> Session:
        return self._by_id[session_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._by_id)

    # -- changes -------------------------------------------------------------------------------
    def create(self, prompt_name: str, title: str | None = None, stored: bool = True) -> Session:
        session = Session(
            id=_new_id(),
            title=title or f"Chat {len(self) + 1}",
            prompt_name=prompt_name,
            system=self.prompts[prompt_name],
            stored=stored,
        )
        self._add(session)
        return session

    def copy(self, source: Session) -> Session:
        """A new stored session with the same system prompt and messages."""
        session = Session(
            id=_new_id(),
            title=f"{source.title} (fork)",
            prompt_name=source.prompt_name,
            system=source.system,
            messages=[dataclasses.replace(m) for m in source.messages],
            settings=dict(source.settings),
            window=source.window,
        )
        self._add(session)
        return session

    def rename(self, session: Session, title: str) -> None:
        session.title = title
        session.revision += 1
        self._save(session)

    def set_system(self, session: Session, name_or_text: str) -> None:
        """Use a shipped prompt by name, or else the text itself, from the next turn on."""
        if name_or_text in self.prompts:
            session.prompt_name, session.system = name_or_text, self.prompts[name_or_text]
        else:
            session.prompt_name, session.system = CUSTOM_PROMPT, name_or_text
        session.revision += 1
        self._save(session)

    def set_setting(self, session: Session, name: str, text: str, base: SamplingParams) -> None:
        """Set (or with "default", unset) one of the session's sampling SETTINGS; checked
        against `base`, the app's parameters, as they are used together."""
        name = name.replace("-", "_")
        if name not in SETTINGS:
            raise UserError(f"no setting {name!r}: settings are {', '.join(SETTINGS)}")
        settings = dict(session.settings)
        if text == "default":
            settings.pop(name, None)
        else:
            try:
                settings[name] = SETTINGS[name](text)
                dataclasses.replace(base, **settings)  # SamplingParams checks its values
            except ValueError as error:
                raise UserError(f"/set {name}: {error}") from None
        session.settings = settings
        session.revision += 1
        self._save(session)

    def set_lora(self, session: Session, name: str | None) -> None:
        """Run the session's next turns under LoRA adapter `name` (None: the base model). Kept
        with the sampling settings, so it is stored, copied by a fork and shown beside them."""
        settings = {k: v for k, v in session.settings.items() if k != "lora"}
        if name is not None:
            settings["lora"] = name
        session.settings = settings
        session.revision += 1
        self._save(session)

    def search(self, text: str) -> list[tuple[Session, str]]:
        """Sessions whose title or messages contain `text` (any case), each with where."""
        needle = text.casefold()
        found = []
        for session in self.values():
            if needle in session.title.casefold():
                found.append((session, "title"))
                continue
            for message in reversed(session.messages):  # the latest mention first
                at = message.content.casefold().find(needle)
                if at >= 0:
                    found.append((session, _snippet(message.content, at, len(needle))))
                    break
        return found

    def clear(self, session: Session) -> None:
        require_idle(session)
        session.messages.clear()
        session.window = 0
        session.error = None
        session.tokens = None
        self.rewrite(session)

    def delete(self, session: Session) -> None:
        """Forget the session and its stored messages (its turn must be ended first)."""
        del self._by_id[session.id]
        if session.stored:
            self.store.delete_session(session.id)

    def append(self, session: Session, message: Message) -> None:
        session.messages.append(message)
        if session.stored:
            self.store.add_message(session.id, message)

    def checkpoint(self, sessions: list[Session]) -> None:
        """Store the replies these sessions are generating, as they are now."""
        replies = {s.id: s.reply for s in sessions if s.stored and s.reply}
        if replies:
            self.store.checkpoint(replies)

    def end_checkpoint(self, session: Session) -> None:
        """The session's turn has ended: a checkpoint not completed by `append` is dropped."""
        if session.stored:
            self.store.discard_checkpoint(session.id)

    def rewrite(self, session: Session) -> None:
        """Store the session's messages as they are now (after an edit other than appending)."""
        if session.stored:
            self.store.replace_messages(session)

    def _add(self, session: Session) -> None:
        self._by_id[session.id] = session
        if session.stored:
            self.store.save_session(session)
            self.store.replace_messages(session)

    def _save(self, session: Session) -> None:
        if session.stored:
            self.store.save_session(session)


def require_idle(session: Session) -> None:
    """The session can take a new turn now: it is local and not generating."""
    if session.remote is not None:
        raise UserError(f"{session.title} is a remote tenant's conversation and read-only here; "
                        f"fork it to continue locally")
    if session.busy:
        raise UserError("a reply is still being generated: stop it first")


def _snippet(text: str, at: int, length: int, around: int = 30) -> str:
    start, end = max(0, at - around), at + length + around
    flat = " ".join(text[start:end].split())
    return ("…" if start else "") + flat + ("…" if end < len(text) else "")


def _new_id() -> str:
    return uuid.uuid4().hex[:12]
