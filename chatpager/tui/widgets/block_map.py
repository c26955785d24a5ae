"""The block map: one cell per physical KV block (or per group of blocks when the pool is
larger than the area), coloured by state, the focused session's blocks drawn solid, and
blocks that were just copied on write marked."""
from __future__ import annotations

import itertools
import math
from collections.abc import Collection

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

from chatpager.engine.outputs import CacheSnapshot

FREE_STYLE = Style(color="grey35")
CACHED_STYLES = tuple(Style(color=c) for c in ("#25467d", "#3466b8", "#4f8be6", "#8ab8ff"))  # old → new
USED_STYLE = Style(color="#4cbb5a")
SHARED_STYLES = tuple(Style(color=c) for c in ("#e6cf3c", "#f0962e", "#e8473f"))  # refcount 2, 3, 4+
COW_STYLE = Style(color="#e05ce0", bold=True)
FREE_GLYPH, BLOCK_GLYPH, FOCUS_GLYPH, COW_GLYPH = "·", "■", "█", "◆"
COW_MARK_REFRESHES = 8  # how many refreshes a copied block stays marked


def block_rank(snapshot: CacheSnapshot, block: int, lru_age: dict[int, float]) -> tuple[int, Style]:
    """How interesting a block is (for grouping: the highest wins) and its style."""
    refcount = snapshot.refcounts[block]
    if refcount > 1:
        return 2 + refcount, SHARED_STYLES[min(refcount, 4) - 2]
    if refcount == 1:
        return 2, USED_STYLE
    if snapshot.hashed[block]:
        age = lru_age.get(block, 0.0)
        return 1, CACHED_STYLES[min(int(age * len(CACHED_STYLES)), len(CACHED_STYLES) - 1)]
    return 0, FREE_STYLE


def lru_ages(snapshot: CacheSnapshot) -> dict[int, float]:
    """Cached free blocks: 0 = next to be evicted … 1 = freed most recently."""
    cached = [block for block in snapshot.free_order if snapshot.hashed[block]]
    return {block: i / max(len(cached) - 1, 1) for i, block in enumerate(cached)}


class BlockMap(Widget):
    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self.snapshot: CacheSnapshot | None = None
        self.focus_blocks: frozenset[int] = frozenset()
        self._cow_marks: dict[int, int] = {}  # block -> refreshes left
        self._last_cow: tuple[tuple[int, int], ...] = ()
        self._rows: list[Strip] | None = None  # drawn rows, until the next snapshot or resize

    def show(self, snapshot: CacheSnapshot, focus_blocks: Collection[int]) -> None:
        for block in list(self._cow_marks):
            self._cow_marks[block] -= 1
            if self._cow_marks[block] <= 0:
                del self._cow_marks[block]
        if snapshot.recent_cow != self._last_cow:
            fresh = snapshot.recent_cow[len(_overlap(self._last_cow, snapshot.recent_cow)):]
            for _, destination in fresh:
                self._cow_marks[destination] = COW_MARK_REFRESHES
            self._last_cow = snapshot.recent_cow
        self.snapshot = snapshot
        self.focus_blocks = frozenset(focus_blocks)
        self._rows = None
        self.refresh()

    @property
    def copied_blocks(self) -> frozenset[int]:
        """Blocks that were written by a copy on write a moment ago."""
        return frozenset(self._cow_marks)

    def blocks_per_cell(self) -> int:
        cells = max(self.size.width * self.size.height, 1)
        return max(1, math.ceil(self.snapshot.num_blocks / cells)) if self.snapshot else 1

    def cells(self) -> list[tuple[str, Style]]:
        """One (glyph, style) per cell, in physical block order."""
        snapshot = self.snapshot
        if snapshot is None:
            return []
        ages = lru_ages(snapshot)
        per_cell = self.blocks_per_cell()
        cells = []
        for start in range(0, snapshot.num_blocks, per_cell):
            blocks = range(start, min(start + per_cell, snapshot.num_blocks))
            rank, style = max((block_rank(snapshot, b, ages) for b in blocks), key=lambda r: r[0])
            if any(b in self._cow_marks for b in blocks):
                cells.append((COW_GLYPH, COW_STYLE))
            elif any(b in self.focus_blocks for b in blocks):
                cells.append((FOCUS_GLYPH, style))
            else:
                cells.append((FREE_GLYPH if rank == 0 else BLOCK_GLYPH, style))
        return cells

    def on_resize(self) -> None:
        self._rows = None

    def render_line(self, y: int) -> Strip:
        # Rows are built once per snapshot, as runs of one style: a pool of thousands of
        # blocks redrawn several times a second must stay cheap.
        if self._rows is None:
            self._rows = self._build_rows()
        return self._rows[y] if y < len(self._rows) else Strip.blank(self.size.width)

    def _build_rows(self) -> list[Strip]:
        width = self.size.width
        if self.snapshot is None or width == 0:
            return [Strip([Segment("no pool yet", Style(dim=True))])]
        cells = self.cells()
        rows = []
        for start in range(0, len(cells), width):
            row = cells[start:start + width]
            segments = [
                Segment("".join(glyph for glyph, _ in run), style)
                for style, run in itertools.groupby(row, key=lambda cell: cell[1])
            ]
            rows.append(Strip(segments, len(row)))
        return rows


def _overlap(old: tuple, new: tuple) -> tuple:
    """`recent_cow` is a bounded window: find where the new events start."""
    for shift in range(len(old) + 1):
        tail = old[shift:]
        if new[: len(tail)] == tail:
            return tail
    return ()
