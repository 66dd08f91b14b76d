"""The leaderboard's plots, as PNG bytes (deterministic: no timestamp or software tag)."""

from __future__ import annotations

import io

import numpy as np

from benchmark.leaderboard import Leaderboard


def render_png(lb: Leaderboard) -> bytes:
    """Primary-metric means with CI error bars, one line per method; deterministic bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(reversed(lb.rows))  # best at the top
    fig = Figure(figsize=(7.0, 1.2 + 0.45 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))
    means = np.array([r.mean[lb.primary] for r in rows])
    lo = np.array([r.ci[lb.primary][0] for r in rows])
    hi = np.array([r.ci[lb.primary][1] for r in rows])
    ax.errorbar(means, y, xerr=[means - lo, hi - means], fmt="o", color="#1f77b4", ecolor="#444444", capsize=4)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r.letter}: {r.label}" for r in rows])
    ax.set_xlabel(f"{lb.primary} (mean over {lb.n_users:,} users, {100 * lb.confidence:g}% bootstrap CI)")
    ax.set_title(f"{lb.dataset} — {lb.protocol}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


COST_FLOOR_S = 0.01  # a row faster than this is drawn at it (a log axis has no zero)


def label_steps(x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[int]:
    """How many label heights to move each point's label down so that no two labels overlap.

    Labels sit right of their points; two collide when their points are within ~0.7 decades of
    each other on the log x axis and their text lines within one label height (about 4% of the
    plotted y range). Higher points keep their place; a lower one moves down until it is free.
    """
    if len(x) == 0:
        return []
    height = 0.04 * max(float(np.max(hi) - np.min(lo)), 1e-12)
    logx = np.log10(x)
    placed: list[tuple[float, float]] = []
    steps = [0] * len(x)
    for i in sorted(range(len(x)), key=lambda j: (-y[j], logx[j])):
        k = 0
        while any(abs(logx[i] - px) < 0.7 and abs(y[i] - k * height - py) < height for px, py in placed):
            k += 1
        placed.append((float(logx[i]), float(y[i] - k * height)))
        steps[i] = k
    return steps


def render_cost_png(lb: Leaderboard) -> bytes:
    """Primary metric (with its CI) against training + evaluation seconds on a log axis; one point per row.

    Times are the row's means over seeds (a cached fit counts its original training time).
    Rows without any recorded time are left out and named under the axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    timed = [r for r in lb.rows if r.train_time_s is not None or r.eval_time_s is not None]
    untimed = [r for r in lb.rows if r not in timed]
    fig = Figure(figsize=(7.0, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cost = np.array([max((r.train_time_s or 0.0) + (r.eval_time_s or 0.0), COST_FLOOR_S) for r in timed])
    means = np.array([r.mean[lb.primary] for r in timed])
    lo = np.array([r.ci[lb.primary][0] for r in timed])
    hi = np.array([r.ci[lb.primary][1] for r in timed])
    if timed:
        ax.errorbar(cost, means, yerr=[means - lo, hi - means], fmt="o", color="#1f77b4", ecolor="#444444", capsize=4)
        for r, x, y, step in zip(timed, cost, means, label_steps(cost, means, lo, hi)):
            ax.annotate(f"{r.letter}: {r.label}", (x, y), xytext=(6, 4 - 11 * step), textcoords="offset points",
                        fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#888888"} if step else None)
        ax.set_xlim(cost.min() / 3.0, cost.max() * 6.0)  # room for the labels on the right
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))  # 0.1, 1, 10, 100 rather than 10^k
    ax.xaxis.set_minor_formatter(NullFormatter())
    xlabel = f"training + evaluation time (s, log scale; mean over seeds; below {COST_FLOOR_S:g} s drawn at it)"
    if untimed:
        xlabel += "\nno recorded time: " + ", ".join(f"{r.letter}: {r.label}" for r in untimed)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{lb.primary} ({100 * lb.confidence:g}% bootstrap CI)")
    ax.set_title(f"{lb.dataset} — {lb.protocol}: quality against cost")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
