"""The focused session's block tables: logical block → physical block, refcount, hit/miss.
Null entries (released outside a sliding window) are one leading run, shown as one line."""
from __future__ import annotations

from collections.abc import Collection, Sequence

from rich.text import Text
from textual.widgets import Static

from chatpager.engine.outputs import SequenceView
from chatpager.tui.widgets.block_map import COW_STYLE, SHARED_STYLES, USED_STYLE



ENTRY_WIDTH = 16  # "  7→ 123×2 hit " and a space


def describe(
    view: SequenceView,
    refcounts: Sequence[int],
    block_size: int,
    copied: Collection[int],
    columns: int,
) -> Text:
    """A header line, then `logical→physical ×refcount hit|miss|cow` for every block held."""
    hit_blocks = view.num_cached_tokens // block_size
    text = Text.assemble(
        (view.request_id, "bold"),
        f" {view.status} · {view.num_tokens} tok, {view.num_cached_tokens} cached",
    )
    nulls = len(view.block_table) - len(view.held_blocks)
    if nulls:
        first = "  0" if nulls == 1 else f"  0-{nulls - 1}"
        text.append(f"\n{first}→ released (outside the sliding window)", "dim")
    for index, block in enumerate(view.block_table[nulls:], start=nulls):
        text.append("\n" if (index - nulls) % columns == 0 else " ")
        refcount = refcounts[block]
        style = SHARED_STYLES[min(refcount, 4) - 2] if refcount > 1 else USED_STYLE
        text.append(f"{index:>3}→{block:>4}", style)
        text.append(f"×{refcount:<2}" if refcount > 1 else "   ", style)
        if block in copied:
            text.append("cow ", COW_STYLE)
        elif index < hit_blocks:
            text.append("hit ")
        else:
            text.append("miss", "dim")
    return text


class BlockTable(Static):
    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self._lines = 0
    def show(
        self,
        views: Sequence[SequenceView],
        refcounts: Sequence[int],
        block_size: int,
        copied: Collection[int],
        idle_note: str,
    ) -> None:
        if views:
            # The container's width, not this widget's: that one follows the content.
            width = self.parent.scrollable_content_region.width if self.parent else self.size.width
            columns = max(1, (width + 1) // ENTRY_WIDTH)
            text = Text("\n").join(
                describe(v, refcounts, block_size, copied, columns) for v in views
            )
        else:
            text = Text(idle_note, style="dim")
        lines = len(text.wrap(self.app.console, max(self.size.width, 1)))
        self.update(text, layout=lines != self._lines)  # a new layout only for a new height
        self._lines = lines
