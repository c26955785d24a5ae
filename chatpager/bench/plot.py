"""`--plot PATH.png`: KV utilization and blocks in use over the chatpager run, and the
throughput of every runner side by side. Reads only the report dict."""
from __future__ import annotations

from pathlib import Path


def plot_report(report: dict, path: str | Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'chatpager[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace, cp = report["trace"], report["chatpager"]
    fig, (util, blocks, tput) = plt.subplots(3, 1, figsize=(9, 10), constrained_layout=True)
    busy = [(t, 100 * u) for t, u, n in zip(trace["t"], trace["kv_utilization"], trace["used_blocks"]) if n]
    util.plot([t for t, _ in busy], [u for _, u in busy], lw=1)
    util.axhline(100 * cp["kv_utilization_mean"], ls="--", color="gray",
                 label=f"mean {cp['kv_utilization_mean']:.1%}")
    util.set(title="KV utilization (tokens held ÷ slots in blocks held by live sequences)",
             xlabel="seconds", ylabel="%", ylim=(max(0, min((u for _, u in busy), default=0) - 5), 100.5))
    util.legend(loc="lower right")

    blocks.plot(trace["t"], trace["used_blocks"], lw=1, label="blocks in use")
    if cp["peak_blocks"] * 4 > cp["num_blocks"]:  # else the pool line would flatten the curve
        blocks.axhline(cp["num_blocks"], ls="--", color="gray", label="pool")
    blocks.set(title=f"Blocks in use (pool: {cp['num_blocks']}) and running sequences", xlabel="seconds",
               ylabel="blocks", ylim=(0, None))
    running = blocks.twinx()
    running.plot(trace["t"], trace["running"], lw=1, color="tab:orange", label="running sequences")
    running.set_ylabel("sequences")
    lines = blocks.get_legend_handles_labels()[0] + running.get_legend_handles_labels()[0]
    blocks.legend(lines, [ln.get_label() for ln in lines], loc="lower center")

    names = [k for k in ("chatpager", "transformers_serial", "transformers_static") if k in report]
    values = [report[k]["output_tokens_per_s"] for k in names]
    bars = tput.bar([n.replace("_", "\n") for n in names], values, color=["tab:green", "tab:gray", "tab:blue"][:len(names)])
    tput.bar_label(bars, fmt="%.1f")
    tput.set(title="Output tokens/s, same workload (transformers re-sends the history each turn)",
             ylabel="tokens/s")
    fig.savefig(path, dpi=110)
    plt.close(fig)
