"""Search results across sessions: pick one to switch to it."""
from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from chatpager.tui.session import Session


class SearchResults(ModalScreen[str | None]):
    """Dismissed with the chosen session's id, or None."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel", id="search.cancel")]

    def __init__(self, text: str, found: Sequence[tuple[Session, str]]) -> None:
        super().__init__()
        self.text = text
        self.found = found

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            count = "1 session mentions" if len(self.found) == 1 else f"{len(self.found)} sessions mention"
            yield Static(f"{count} {self.text!r}", classes="dialog-title", markup=False)
            yield OptionList(*(
                Option(Text.assemble((session.title, "bold"), "\n  ", (where, "dim")), id=session.id)
                for session, where in self.found
            ))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
