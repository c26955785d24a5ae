"""Demo mode: simulated tenants that each run a scripted conversation.

Tenant k uses the k-th shipped prompt (round robin) and sends user turns from a bundled list,
starting at its own offset; each turn is sent when the previous reply has ended. Tenants are
ordinary sessions (not stored); stopping a tenant's reply ends its script.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from chatpager.engine.sampling_params import SamplingParams
from chatpager.tui.session import Session
from chatpager.tui.sessions import Sessions
from chatpager.tui.turns import Turns

TURNS_FILE = Path(__file__).with_name("swarm_turns.txt")


def load_turns(path: Path = TURNS_FILE) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Swarm:
    def __init__(
        self,
        sessions: Sessions,
        turns: Turns,
        lines: list[str],
        params: SamplingParams,
        turns_per_tenant: int = 4,
    ) -> None:
        self.sessions = sessions
        self.turns = turns
        self.lines = lines  # the user turns scripts are drawn from
        self.params = params
        self.turns_per_tenant = turns_per_tenant
        self._tenants: set[str] = set()  # session ids
        self._scripts: dict[str, deque[str]] = {}  # tenant session id -> turns still to send
        self._serial = itertools.count(1)

    def spawn(self, count: int) -> list[Session]:
        prompt_names = list(self.sessions.prompts)
        tenants = []
        for _ in range(count):
            k = next(self._serial)
            prompt = prompt_names[(k - 1) % len(prompt_names)]
            session = self.sessions.create(prompt, title=f"tenant {k}", stored=False)
            start = (k * 7) % len(self.lines)
            script = deque(
                self.lines[(start + i) % len(self.lines)] for i in range(self.turns_per_tenant)
            )
            self._tenants.add(session.id)
            self._scripts[session.id] = script
            self._next_turn(session)
            tenants.append(session)
        return tenants

    def is_tenant(self, session: Session) -> bool:
        return session.id in self._tenants

    @property
    def active(self) -> int:
        """Tenants whose script is still running."""
        return len(self._scripts)

    def advance(self, finished: Iterable[tuple[str, str]]) -> None:
        """Send each tenant whose reply ended normally its next turn."""
        for session_id, reason in finished:
            session = self.sessions.get(session_id)
            ended_normally = reason in ("stop", "length")
            if session_id not in self._scripts or session is None or not ended_normally:
                self._scripts.pop(session_id, None)
                continue
            self._next_turn(session)

    def stop(self, session: Session) -> None:
        """End a tenant's script and its reply."""
        self._scripts.pop(session.id, None)
        self.turns.stop(session)

    def stop_all(self) -> None:
        for session_id in list(self._scripts):
            session = self.sessions.get(session_id)
            self._scripts.pop(session_id)
            if session is not None:
                self.turns.stop(session)

    def _next_turn(self, session: Session) -> None:
        script = self._scripts[session.id]
        if not script:
            del self._scripts[session.id]
            return
        self.turns.send(session, script.popleft(), self.params)
