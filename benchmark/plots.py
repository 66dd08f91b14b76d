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
