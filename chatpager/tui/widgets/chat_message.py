"""One message of a chat, rendered as Markdown under its role."""
from __future__ import annotations

import unicodedata

from textual.widgets import Markdown


def printable(text: str) -> str:
    """Text without control, format or unassigned characters: a model can emit any byte,
    and a terminal must not receive escapes, bidi overrides or zero-width marks from it."""
    return "".join(
        c if c in "\n\t" or unicodedata.category(c)[0] != "C" else "\ufffd" for c in text
    )


class ChatMessage(Markdown):
    def __init__(self, role: str, text: str = "", interrupted: bool = False) -> None:
        super().__init__(printable(text), classes=f"-{role}")
        self.border_title = "you" if role == "user" else role
        if interrupted:
            self.border_subtitle = "interrupted: chatpager stopped while it was generated"
