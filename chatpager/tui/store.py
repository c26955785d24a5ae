"""Durable conversations: one SQLite file in the user data directory.

Every change is committed at once (WAL journal). A reply being generated is checkpointed
(`checkpoint`, all replies in one transaction) as a row whose status is "streaming"; when its
turn ends the same row is completed. Opening the store marks rows still "streaming" as
"interrupted": the process that wrote them died, and what they hold is all that is left.
Sessions come back in creation order; messages whose session is gone are ignored.

The schema carries a version (`PRAGMA user_version`): an older database is migrated in one
transaction, a newer one is refused with a message that says so.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from chatpager.errors import ChatpagerError
from chatpager.tui.session import Message, Session

SCHEMA_VERSION = 2
DONE, STREAMING, INTERRUPTED = "done", "streaming", "interrupted"

_SCHEMA = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    prompt_name TEXT NOT NULL,
    system TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done'
);
CREATE INDEX messages_by_session ON messages(session_id, id);
"""
# From each version to the next; version 1 (chatpager 0.1) had no settings and no status.
_MIGRATIONS = {
    1: """
    ALTER TABLE sessions ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'done';
    """,
}


class StoreError(ChatpagerError):
    """The conversations database cannot be used by this version of chatpager."""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit
        self._streaming: dict[str, int] = {}  # session id -> row of its reply being generated
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._open_schema()
            self._db.execute("UPDATE messages SET status = ? WHERE status = ?", (INTERRUPTED, STREAMING))
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise StoreError(f"{path} is not a chatpager database ({error}); move it away "
                             f"or choose another --data-dir") from None
        except StoreError:
            self._db.close()
            raise

    def load(self) -> list[Session]:
        sessions = [
            Session(id=row[0], title=row[1], prompt_name=row[2], system=row[3],
                    settings=_settings(row[4]))
            for row in self._db.execute(
                "SELECT id, title, prompt_name, system, settings FROM sessions ORDER BY rowid"
            )
        ]
        by_id = {session.id: session for session in sessions}
        for session_id, role, content, status in self._db.execute(
            "SELECT session_id, role, content, status FROM messages ORDER BY id"
        ):
            if session_id in by_id:  # an orphan (written without foreign keys) is skipped
                by_id[session_id].messages.append(Message(role, content, status == INTERRUPTED))
        return sessions

    def save_session(self, session: Session) -> None:
        """Insert or update the session's title, system prompt and settings (not its messages)."""
        self._db.execute(
            "INSERT INTO sessions (id, title, prompt_name, system, settings) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET title=excluded.title, prompt_name=excluded.prompt_name, "
            "system=excluded.system, settings=excluded.settings",
            (session.id, session.title, session.prompt_name, session.system,
             json.dumps(session.settings, sort_keys=True)),
        )

    def add_message(self, session_id: str, message: Message) -> None:
        """Append a message; a reply that was checkpointed is completed in its own row."""
        row = self._streaming.pop(session_id, None)
        if row is not None:
            self._db.execute("UPDATE messages SET content = ?, status = ? WHERE id = ?",
                             (message.content, _status(message), row))
        else:
            self._db.execute(
                "INSERT INTO messages (session_id, role, content, status) VALUES (?, ?, ?, ?)",
                (session_id, message.role, message.content, _status(message)),
            )

    def checkpoint(self, replies: dict[str, str]) -> None:
        """Write each session's reply so far (session id -> text), in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            for session_id, text in replies.items():
                row = self._streaming.get(session_id)
                if row is None:
                    cursor = self._db.execute(
                        "INSERT INTO messages (session_id, role, content, status) "
                        "VALUES (?, 'assistant', ?, ?)", (session_id, text, STREAMING))
                    self._streaming[session_id] = cursor.lastrowid
                else:
                    self._db.execute("UPDATE messages SET content = ? WHERE id = ?", (text, row))

    def discard_checkpoint(self, session_id: str) -> None:
        """The turn ended with no reply to keep: drop what was checkpointed of it."""
        row = self._streaming.pop(session_id, None)
        if row is not None:
            self._db.execute("DELETE FROM messages WHERE id = ?", (row,))

    def replace_messages(self, session: Session) -> None:
        """Store the session's messages as they are now, in one transaction."""
        self._streaming.pop(session.id, None)
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM messages WHERE session_id = ?", (session.id,))
            self._db.executemany(
                "INSERT INTO messages (session_id, role, content, status) VALUES (?, ?, ?, ?)",
                [(session.id, m.role, m.content, _status(m)) for m in session.messages],
            )

    def delete_session(self, session_id: str) -> None:
        self._streaming.pop(session_id, None)
        self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def close(self) -> None:
        self._db.close()

    def _open_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sessions'").fetchone()
        if version == 0 and has_tables:
            version = 1  # chatpager 0.1 wrote no version
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer chatpager (schema version {version}; this "
                f"one reads up to {SCHEMA_VERSION}). Upgrade chatpager, or choose another --data-dir."
            )
        if version == SCHEMA_VERSION:
            return
        with self._db:
            self._db.execute("BEGIN")
            if version == 0:
                for statement in _statements(_SCHEMA):
                    self._db.execute(statement)
            else:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _statements(_MIGRATIONS[step]):
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _statements(script: str) -> list[str]:
    # executescript() would commit first: run each statement inside the one transaction.
    return [s.strip() for s in script.split(";") if s.strip()]


def _status(message: Message) -> str:
    return INTERRUPTED if message.interrupted else DONE


def _settings(text: str) -> dict:
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return settings if isinstance(settings, dict) else {}
