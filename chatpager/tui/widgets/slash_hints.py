"""A line under the input listing the slash commands that match what is typed."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from chatpager.tui import slash


class SlashHints(Static):
    def show_for(self, text: str) -> None:
        commands = slash.matching(text)
        self.display = bool(commands)
        self.update(
            Text("\n").join(
                Text.assemble((command.signature, "bold"), " ", (command.help, "dim"))
                for command in commands
            )
        )
