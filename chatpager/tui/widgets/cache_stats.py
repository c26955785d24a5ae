"""The cache's counters, and the model that fills it."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def stats_table(stats: dict, model: str) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold")
    table.add_column()
    total = stats["num_blocks"]
    table.add_row("model", Text(model))
    table.add_row(
        "blocks",
        f"{stats['used_blocks']} used · {stats['cached_blocks']} cached · "
        f"{stats['free_blocks'] - stats['cached_blocks']} free /{total}",
    )
    table.add_row(
        "kv util",
        f"{_percent(stats['kv_utilization'])} · sharing {stats['sharing_ratio']:.2f}×",
    )
    table.add_row(
        "prefix hit",
        f"{_percent(stats['prefix_hit_rate'])} "
        f"({stats['prefix_hit_tokens']}/{stats['prefix_query_tokens']} tok)",
    )
    table.add_row(
        "events",
        f"evict {stats['evictions']} · preempt {stats['preemptions']} · CoW {stats['cow_copies']}",
    )
    table.add_row(
        "requests",
        f"run {stats['running']} · wait {stats['waiting']} · swap {stats['swapped']}",
    )
    table.add_row("decode", f"{stats['decode_tokens_per_s']:.1f} tok/s")
    return table


class CacheStats(Static):
    def show(self, stats: dict, model: str) -> None:
        self.update(stats_table(stats, model))

    def show_status(self, model: str) -> None:
        """Before there are stats: the model's loading state."""
        table = Table.grid(padding=(0, 1))
        table.add_column(style="bold")
        table.add_row("model", Text(model))
        self.update(table)
