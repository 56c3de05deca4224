"""The study report's figures: learning curves of the finals, and the tuning cost of each norm.

The tuning-cost figure is Dodge et al. (2019, "Show your work"): the expected best validation score of n
sweep configurations drawn from those the cell tried, against n. A norm whose curve is still rising at the
sweep's size would likely gain from more search; curves that flatten early say the budget was enough.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from kn_dist.stats import expected_max
from kn_dist.sweep import is_kn


def mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per-epoch mean and sd over runs (cut to the shortest run)."""
    length = min(len(c) for c in curves)
    columns = [[c[i] for c in curves] for i in range(length)]
    means = [statistics.fmean(c) for c in columns]
    sds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return means, sds


def _axes(figsize: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def _save(fig: Any, ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: Path, model: str, curves: dict[str, list[list[float]]], val_label: str) -> None:
    """Val top-1 per epoch of each norm's finals, mean ± sd over seeds."""
    fig, ax = _axes((6, 4))
    for norm, runs in sorted(curves.items()):
        means, sds = mean_curve(runs)
        epochs = list(range(1, len(means) + 1))
        lo = [100 * (m - s) for m, s in zip(means, sds, strict=True)]
        hi = [100 * (m + s) for m, s in zip(means, sds, strict=True)]
        line = ax.plot(epochs, [100 * m for m in means], "-" if is_kn(norm) else "--", marker="o", label=norm)[0]
        ax.fill_between(epochs, lo, hi, alpha=0.2, color=line.get_color())
    n = max(len(runs) for runs in curves.values())
    ax.set(xlabel="epoch", ylabel=f"{val_label} top-1 (%)", title=f"{model}: final runs, mean ± sd over {n} seeds")
    _save(fig, ax, path)


def tuning_cost(scores: list[float]) -> list[float]:
    """Expected best score of n = 1 .. len(scores) configurations drawn from `scores`."""
    return [expected_max(scores, n) for n in range(1, len(scores) + 1)]


def plot_tuning_cost(path: Path, model: str, scores: dict[str, list[float]], epoch: int) -> None:
    """Expected best val top-1 against the number of sweep configurations, one line per norm."""
    fig, ax = _axes((6, 4))
    for norm, values in sorted(scores.items()):
        curve = tuning_cost(values)
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], "-" if is_kn(norm) else "--", marker="o",
                label=norm)  # fmt: skip
    ax.set(
        xlabel="configurations tried (n)",
        ylabel=f"expected best val top-1 at epoch {epoch} (%)",
        title=f"{model}: tuning cost (Dodge et al. 2019)",
    )
    _save(fig, ax, path)
