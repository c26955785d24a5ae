"""Messages that cross widgets (and the engine loop's wake-up call)."""
from __future__ import annotations

from textual.message import Message


class EngineActivity(Message):
    """The engine loop has events to drain. Posted from the loop's reporting thread; a pending
    one stands for any number, so the UI does one drain per burst, never one call per token."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EngineActivity)


class SessionSelected(Message):
    def __init__(self, session_id: str) -> None:
        super().__init__()
        self.session_id = session_id


class PromptSubmitted(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
