"""A line under the input listing the slash commands that match what is typed."""
from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static


class SlashHints(Static):
    def show(self, hints: Sequence[tuple[str, str]]) -> None:
        """One line per (signature, help); hidden when there is none."""
        self.display = bool(hints)
        self.update(
            Text("\n").join(Text.assemble((signature, "bold"), " ", (help, "dim")) for signature, help in hints)
        )
