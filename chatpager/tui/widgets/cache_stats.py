"""The cache's counters, and the model that fills it."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def stats_table(stats: dict, model_info: dict, contiguous: tuple[int, int] | None = None) -> Table:
    """`contiguous`: (blocks held, blocks a contiguous allocator would reserve) for the
    sequences running now, see Turns.contiguous_need."""
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold")
    table.add_column(no_wrap=True, overflow="ellipsis")
    total = stats["num_blocks"]
    table.add_row("model", Text(model_info["name"]))
    table.add_row("runtime", runtime_label(model_info))
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
    running = stats["running"] > 0
    table.add_row("decode", (f"{stats['decode_tokens_per_s']:.1f} tok/s" if running else "idle")
                  + speculation_label(stats))
    if contiguous is None:
        table.add_row("vs contig", "—")
    else:
        held, reserved = contiguous
        table.add_row("vs contig", f"{held} held · contiguous {reserved} ({reserved / held:.1f}×)")
    return table


class CacheStats(Static):
    """A fixed number of lines (see the stylesheet), so updates need no new layout."""

    def show(self, stats: dict, model_info: dict, contiguous: tuple[int, int] | None = None) -> None:
        self.update(stats_table(stats, model_info, contiguous), layout=False)

    def show_status(self, model_status: str) -> None:
        """Before there are stats: the model's loading state."""
        table = Table.grid(padding=(0, 1))
        table.add_column(style="bold")
        table.add_row("model", Text(model_status))
        self.update(table, layout=False)


ATTENTION_LABELS = {"cpu": "C kernel"}  # the attention backend's name, where it alone would not say what it is


def runtime_label(info: dict) -> str:
    """'cpu · float32 · int4 · C kernel': device, dtype, weight and KV quantization, attention."""
    attention = ATTENTION_LABELS.get(info["attention"], info["attention"])
    return f"{info['device']} · {info['dtype']}{quantization_label(info)}{kv_label(info)} · {attention}"


def quantization_label(info: dict) -> str:
    """' · int4' for quantized weights; nothing for the unquantized default of float checkpoints."""
    mode = info.get("quantization", "none")
    return "" if mode == "none" else f" · {mode}"


def kv_label(info: dict) -> str:
    """' · kv int8 (203 KiB/block)' for a KV cache stored in another dtype than the weights'."""
    kv = info.get("kv_cache_dtype")
    if kv is None or kv == info.get("dtype"):
        return ""
    return f" · kv {kv} ({info.get('kv_bytes_per_block', 0) / 1024:.0f} KiB/block)"


def speculation_label(stats: dict) -> str:
    """' · spec 53 % accepted, 2.1 tok/step' once speculative decoding has proposed tokens."""
    if not stats.get("spec_proposed_tokens"):
        return ""
    return (f" · spec {_percent(stats['spec_acceptance_rate'])} accepted, "
            f"{stats['spec_tokens_per_step']:.1f} tok/step")
