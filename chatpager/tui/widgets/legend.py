"""What the block map's glyphs and colours mean."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from chatpager.tui.widgets.block_map import (
    BLOCK_GLYPH,
    CACHED_STYLES,
    COW_GLYPH,
    COW_STYLE,
    FOCUS_GLYPH,
    FREE_GLYPH,
    FREE_STYLE,
    SHARED_STYLES,
    USED_STYLE,
)


def legend() -> Text:
    return Text.assemble(
        (FREE_GLYPH, FREE_STYLE), " free  ",
        *((BLOCK_GLYPH, style) for style in CACHED_STYLES), " cached, old→new  ",
        (BLOCK_GLYPH, USED_STYLE), " used  ",
        *((BLOCK_GLYPH, style) for style in SHARED_STYLES), " shared ×2 ×3 ×4+  ",
        (FOCUS_GLYPH, USED_STYLE), " this chat  ",
        (COW_GLYPH, COW_STYLE), " copied on write",
    )


class Legend(Static):
    def __init__(self, id: str | None = None) -> None:
        super().__init__(legend(), id=id)
