"""Durable conversations: one SQLite file in the user data directory.

Every change is committed at once (WAL journal), so a crash loses at most the reply being
generated, which is only written when it ends. Sessions come back in creation order.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from chatpager.tui.session import Message, Session

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    prompt_name TEXT NOT NULL,
    system TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, id);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def load(self) -> list[Session]:
        sessions = [
            Session(id=row[0], title=row[1], prompt_name=row[2], system=row[3])
            for row in self._db.execute(
                "SELECT id, title, prompt_name, system FROM sessions ORDER BY rowid"
            )
        ]
        by_id = {session.id: session for session in sessions}
        for session_id, role, content in self._db.execute(
            "SELECT session_id, role, content FROM messages ORDER BY id"
        ):
            by_id[session_id].messages.append(Message(role, content))
        return sessions

    def save_session(self, session: Session) -> None:
        """Insert or update the session's title and system prompt (not its messages)."""
        self._db.execute(
            "INSERT INTO sessions (id, title, prompt_name, system) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET title=excluded.title, "
            "prompt_name=excluded.prompt_name, system=excluded.system",
            (session.id, session.title, session.prompt_name, session.system),
        )

    def add_message(self, session_id: str, message: Message) -> None:
        self._db.execute(
            "INSERT INTO messages (session_id, role, content) VALUES (?, ?, ?)",
            (session_id, message.role, message.content),
        )

    def replace_messages(self, session: Session) -> None:
        """Store the session's messages as they are now, in one transaction."""
        with self._transaction():
            self._db.execute("DELETE FROM messages WHERE session_id = ?", (session.id,))
            self._db.executemany(
                "INSERT INTO messages (session_id, role, content) VALUES (?, ?, ?)",
                [(session.id, m.role, m.content) for m in session.messages],
            )

    def delete_session(self, session_id: str) -> None:
        self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> sqlite3.Connection:
        self._db.execute("BEGIN")
        return self._db
