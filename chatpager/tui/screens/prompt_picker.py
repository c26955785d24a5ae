"""Choose a system prompt for a new session."""
from __future__ import annotations

from collections.abc import Mapping

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option


def preview(text: str, width: int = 56) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class PromptPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss", "Cancel", id="picker.cancel")]

    def __init__(self, prompts: Mapping[str, str]) -> None:
        super().__init__()
        self.prompts = prompts

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static("New session: choose a system prompt", classes="dialog-title")
            yield OptionList(
                *(
                    Option(Text.assemble((name, "bold"), "\n  ", (preview(self._role(text)), "dim")), id=name)
                    for name, text in self.prompts.items()
                )
            )

    @staticmethod
    def _role(text: str) -> str:
        """The part that tells prompts apart (after a shared preamble)."""
        return text.rsplit("\n\n", 1)[-1]

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
