"""Waiting in Pilot tests: poll a condition between Textual's message rounds."""
from __future__ import annotations

import time

# Generous: a loaded CI machine can take tens of seconds to load a model or start a server;
# a condition that holds returns at once, so only a real hang pays the whole wait.
TIMEOUT_S = 90.0


async def until(pilot, condition, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.05)
