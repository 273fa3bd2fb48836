"""Latency against offered load, as a PNG (matplotlib: `pip install 'batchproxy[plot]'`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batchproxy.bench.results import RunResult


def plot_title(results: Sequence[RunResult]) -> str:
    """What was measured: model, rows per call, how long each run, transport and target."""
    spec = results[0].spec
    bound = " and ".join(filter(None, [
        f"{spec.duration_s:g} s" if spec.duration_s else "",
        f"{spec.requests:,d} requests" if spec.requests else ""]))
    rows = f"{spec.rows} row{'s' if spec.rows != 1 else ''} per call"
    return (f"model {spec.model or '?'}, {rows}, {bound} per run, "
            f"{spec.protocol} to {', '.join(spec.targets)}")


def plot_latency(results: Sequence[RunResult], path: str | Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib: pip install 'batchproxy[plot]'") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda r: r.offered_rate)
    offered = [r.offered_rate for r in ordered]
    latencies = [r.latency_ms() for r in ordered]
    open_loop = all(r.spec.rate for r in ordered)
    fig, (lat_ax, tput_ax) = plt.subplots(2, 1, figsize=(7, 7), sharex=True,
                                          height_ratios=(2, 1))
    for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^-")):
        lat_ax.plot(offered, [lat[key] or float("nan") for lat in latencies], style, label=key)
    lat_ax.set_ylabel("latency (ms)")
    lat_ax.set_yscale("log")
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend()
    lat_ax.set_title(title or plot_title(ordered), fontsize=10)
    tput_ax.plot(offered, [r.throughput for r in ordered], "o-", label="answered")
    if open_loop:
        tput_ax.plot(offered, offered, ":", color="grey", label="offered")
    tput_ax.set_ylabel("requests/s")
    tput_ax.set_xlabel("offered load (requests/s)" if open_loop
                       else "throughput (requests/s), closed loop")
    tput_ax.grid(True, alpha=0.3)
    tput_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
