"""The help screen, generated from the app's bindings and the slash command table."""
from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from chatpager.tui import commands


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,question_mark,q", "dismiss", "Close", id="help.close")]

    def __init__(self, sections: Sequence[tuple[str, Sequence[Binding]]],
                 hint: str | None = None) -> None:
        super().__init__()
        self.sections = sections
        self.hint = hint  # e.g. how to reach the HTTP server of --serve

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static("chatpager — keys and commands", id="help-title")
            for title, bindings in self.sections:
                yield Static(self._keys_table(title, bindings))
            yield Static(self._commands_table())
            if self.hint:
                yield Static(Text(self.hint), id="help-hint")
            yield Static("Esc closes this screen.", classes="dim")

    def _keys_table(self, title: str, bindings: Sequence[Binding]) -> Table:
        table = Table(title=title, title_justify="left", show_header=False, box=None)
        table.add_column(style="bold", width=26)
        table.add_column(ratio=1)
        for binding in bindings:
            if binding.description:
                keys = " / ".join(
                    self.app.get_key_display(Binding(key, binding.action))
                    for key in binding.key.split(",")
                )
                table.add_row(Text(keys), Text(binding.tooltip or binding.description))
        return table

    def _commands_table(self) -> Table:
        table = Table(title="Slash commands (type / in the input; Tab completes)",
                      title_justify="left", show_header=False, box=None)
        table.add_column(style="bold", width=26)
        table.add_column()
        for command in commands.COMMANDS:
            table.add_row(Text(command.signature), Text(command.help))
        return table
