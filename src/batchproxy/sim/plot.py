"""Latency (p50, p99 of the calls answered OK) and goodput inside the SLO against offered
load, one line per system, as a PNG (matplotlib: `pip install 'batchproxy[plot]'`). Goodput
is beside latency because a system that fails most calls can show a low latency for the
few it answers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batchproxy.sim.report import RunResult


def plot_sweep(runs: Sequence[RunResult], path: str | Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib: pip install 'batchproxy[plot]'") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    by_load = all(r.load is not None for r in runs)
    systems = list(dict.fromkeys(r.system for r in runs))
    fig, (p50_ax, p99_ax, good_ax) = plt.subplots(3, 1, figsize=(7, 9), sharex=True,
                                                  height_ratios=(2, 2, 1.5))
    for system in systems:
        points = sorted((r.load if by_load else r.rate_per_s, r) for r in runs
                        if r.system == system)
        x = [p[0] for p in points]
        for ax, key in ((p50_ax, "p50_ms"), (p99_ax, "p99_ms")):
            y = [getattr(r, key) for _, r in points]
            ax.plot(x, [float("nan") if v is None else v for v in y], "o-", label=system)
        good_ax.plot(x, [r.goodput_per_s for _, r in points], "o-", label=system)
    for ax, name in ((p50_ax, "p50"), (p99_ax, "p99")):
        ax.set_ylabel(f"{name} latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    good_ax.set_ylabel("goodput in SLO (calls/s)")
    good_ax.grid(True, alpha=0.3)
    good_ax.legend()
    good_ax.set_xlabel("offered load (fraction of capacity)" if by_load
                       else "offered load (calls/s)")
    p50_ax.set_title(title or "simulated latency against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
