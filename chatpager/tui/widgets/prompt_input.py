"""The message input: multi-line; Enter sends, Ctrl+J (or Shift+Enter) starts a new line.

What `completer` offers for the text typed so far (the screen's: the rest of a slash command
or prompt name) shows as a suggestion that Tab (or the right arrow) accepts. ↑ in an empty
input recalls what was sent before (↓ goes back); once the recalled text is edited, the arrows
move the cursor again.
"""
from __future__ import annotations

from collections.abc import Callable

from textual.binding import Binding
from textual.widgets import TextArea

from chatpager.tui.messages import PromptSubmitted


class PromptInput(TextArea):
    BINDINGS = [
        Binding("enter", "submit", "Send", priority=True, id="input.send",
                tooltip="Send the message, or run the /command"),
        Binding(
            "ctrl+j,shift+enter,alt+enter",
            "newline",
            "New line",
            key_display="^j",
            priority=True,
            id="input.newline",
            tooltip="New line (pasting keeps line breaks too)",
        ),
        Binding("tab", "complete", "Complete", show=False, priority=True, id="input.complete",
                tooltip="Complete a /command or prompt name; else move focus"),
    ]

    def __init__(self, completer: Callable[[str], str] = lambda text: "", id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, compact=True)
        self.completer = completer  # what to add to the text typed so far; "" for nothing
        self.placeholder = "Message (Enter sends, ^j new line, ↑ recalls, / for commands)"
        self.sent: list[str] = []  # what was sent (messages and commands), oldest first
        self._recalled: int | None = None  # index into `sent` of the text shown, while unedited

    def update_suggestion(self) -> None:
        at_end = self.cursor_location == self.document.end
        self.suggestion = self.completer(self.text) if at_end else ""

    # These are priority bindings, so they run before keys typed just ahead of them have
    # reached this widget (a fast typist, a terminal sending a burst): each one queues its
    # work behind those keys.
    def action_submit(self) -> None:
        self.call_later(self._submit)

    def action_newline(self) -> None:
        self.call_later(self.insert, "\n")

    def action_complete(self) -> None:
        self.call_later(self._complete)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and (not self.text or self._browsing()):
            self._recall(-1)
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self._browsing():
            self._recall(1)
        else:
            super().action_cursor_down(select)

    def _browsing(self) -> bool:
        return self._recalled is not None and self.text == self.sent[self._recalled]

    def _recall(self, step: int) -> None:
        start = len(self.sent) if self._recalled is None else self._recalled
        index = start + step
        if index < 0 or not self.sent:
            return
        if index >= len(self.sent):  # past the newest: back to an empty input
            self._recalled = None
            self.clear()
            return
        self._recalled = index
        self.text = self.sent[index]
        self.move_cursor(self.document.end)

    def _submit(self) -> None:
        text = self.text.strip()
        if text:
            self.clear()
            self._recalled = None
            if not self.sent or self.sent[-1] != text:
                self.sent.append(text)
            self.post_message(PromptSubmitted(text))

    def _complete(self) -> None:
        if self.suggestion:
            self.insert(self.suggestion)
        else:
            self.screen.focus_next()
