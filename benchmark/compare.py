"""One pair of units in full detail on every metric (`python -m benchmark compare A B`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tabulate import tabulate

from benchmark.errors import ConfigError
from benchmark.leaderboard import DEFAULT_METRICS, UnitResult, unit_name, unit_series
from benchmark.render import format_mde, format_p, mde_sentence
from benchmark.scoring.metrics import parse_metric
from benchmark.scoring.power import POWER, min_detectable_effect
from benchmark.scoring.stats import (
    align,
    bootstrap_cis,
    check_permutations,
    effect_size,
    paired_t_test,
    randomization_tests,
    win_tie_loss,
)


def compare_units(
    a: UnitResult,
    b: UnitResult,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    n_permutations: int = 10_000,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> str:
    """One pair in full detail on every metric (p-values are per metric, uncorrected)."""
    metrics = list(metrics)
    for m in metrics:
        parse_metric(m)
    check_permutations(n_permutations)
    name_a, name_b = unit_name(a), unit_name(b)
    if name_a == name_b:
        raise ConfigError(f"compare needs two different runs; both are {name_a}")
    conf = f"{100 * confidence:g}%"
    table = []
    n_users = 0
    for m in metrics:
        _, X = align({name_a: unit_series(a, m), name_b: unit_series(b, m)})
        n_users = X.shape[1]
        d = X[0] - X[1]
        ci = bootstrap_cis(np.stack([X[0], X[1], d], axis=1), n_resamples, confidence, seed)
        p_rand = float(randomization_tests(X, [(0, 1)], n_permutations, seed)[0])
        w, t, l = win_tie_loss(X[0], X[1])
        mde = min_detectable_effect(float(d.std(ddof=1)) if n_users > 1 else float("nan"), n_users)
        table.append(
            [
                m,
                f"{X[0].mean():.4f} [{ci[0, 0]:.4f}, {ci[0, 1]:.4f}]",
                f"{X[1].mean():.4f} [{ci[1, 0]:.4f}, {ci[1, 1]:.4f}]",
                f"{d.mean():+.4f} [{ci[2, 0]:+.4f}, {ci[2, 1]:+.4f}]",
                format_p(p_rand),
                format_p(paired_t_test(X[0], X[1])),
                f"{effect_size(X[0], X[1]):+.3f}",
                f"{w}/{t}/{l}",
                format_mde(mde, not abs(float(d.mean())) >= mde),
            ]
        )
    headers = ["Metric", f"A mean [{conf} CI]", f"B mean [{conf} CI]", f"Δ = A − B [{conf} CI]"]
    headers += ["p randomization", "p t-test", "Effect size", "W/T/L", f"MDE ({100 * POWER:g}% power)"]
    lines = [
        f"A: {a.label} ({a.method}, seed {a.seed}, run {a.run_id})",
        f"B: {b.label} ({b.method}, seed {b.seed}, run {b.run_id})",
        f"{n_users:,} users in common (identical user sets). Paired two-sided tests per metric, uncorrected; "
        f"randomization test with {n_permutations:,} sign flips (seed {seed}). {mde_sentence(0.05)}",
        "",
        tabulate(table, headers=headers, tablefmt="github", disable_numparse=True),
    ]
    return "\n".join(lines) + "\n"
