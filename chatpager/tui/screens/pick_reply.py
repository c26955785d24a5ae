"""Pick one of several regenerated replies (or keep the old one)."""
from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, OptionList, Static
from textual.widgets.option_list import Option

from chatpager.tui.screens.prompt_picker import preview
from chatpager.tui.widgets.chat_message import printable


class PickReplyScreen(ModalScreen[int | None]):
    """Dismisses with the index of the chosen alternative, or None to keep the old reply."""

    BINDINGS = [Binding("escape", "dismiss", "Keep the old reply", id="pick.keep")]

    def __init__(self, alternatives: Sequence[str]) -> None:
        super().__init__()
        self.alternatives = list(alternatives)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Static(
                f"{len(self.alternatives)} alternatives: Enter picks, Esc keeps the old reply",
                classes="dialog-title",
            )
            yield OptionList(
                *(
                    Option(Text(f"{i + 1}. {preview(printable(text))}"), id=str(i))
                    for i, text in enumerate(self.alternatives)
                )
            )
            with VerticalScroll(id="pick-preview"):
                yield Markdown(printable(self.alternatives[0]))

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.query_one("#pick-preview Markdown", Markdown).update(
            printable(self.alternatives[event.option_index])
        )

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option_index)
