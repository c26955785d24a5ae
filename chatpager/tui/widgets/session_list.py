"""The sidebar: one entry per session with its title, prompt, state and token count."""
from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from chatpager.tui.messages import SessionSelected
from chatpager.tui.session import Session

STATE_STYLES = {
    "idle": "dim",
    "queued": "yellow",
    "generating": "bold green",
    "preempted": "bold red",
}


def entry(session: Session, current: bool, width: int) -> Text:
    """Two lines: title and prompt; state and tokens."""
    title = Text.assemble(
        ("▶ " if current else "  "),
        (session.title, "bold" if current else ""),
        (f" · {session.prompt_name}", "dim italic"),
    )
    title.truncate(max(width, 8), overflow="ellipsis")
    tokens = "" if session.tokens is None else f" · {session.tokens} tok"
    return Text.assemble(
        title,
        "\n  ",
        ("● " + session.state, STATE_STYLES.get(session.state, "")),
        tokens,
        (" !", "bold red") if session.error else "",
    )


class SessionList(OptionList):
    """Shows sessions; Enter or a click on one posts SessionSelected."""

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self._entries: list[Text] = []  # what each option shows now

    def show(self, sessions: Sequence[Session], current_id: str | None) -> None:
        ids = [session.id for session in sessions]
        width = self.scrollable_content_region.width - 1
        entries = [entry(s, s.id == current_id, width) for s in sessions]
        if ids != [option.id for option in self.options]:
            self.set_options(Option(e, id=session_id) for e, session_id in zip(entries, ids))
        else:
            for index, (old, new) in enumerate(zip(self._entries, entries)):
                if old != new:
                    self.replace_option_prompt_at_index(index, new)
        self._entries = entries
        if current_id in ids and not self.has_focus:
            self.highlighted = ids.index(current_id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.post_message(SessionSelected(event.option.id))
