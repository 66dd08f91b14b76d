"""Building a leaderboard from finished evaluations: rows, CIs, paired tests and markers.

Rendering lives in `benchmark.render` (markdown, JSON, files) and `benchmark.plots` (PNGs);
one pair in full detail in `benchmark.compare`. Input is a list of `UnitResult` (one per
method label and seed, as the run store loads them). Seeds of one label are combined by averaging each user's value over seeds; the
paired tests, bootstrap CIs and markers run on those averaged per-user vectors, and the
spread across seeds is reported beside them. Every label must cover the identical user
set (a StoreError otherwise). Output is deterministic: same units in, same bytes out.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from benchmark.errors import ConfigError, StoreError
from benchmark.scoring.metrics import parse_metric
from benchmark.scoring.stats import (
    CORRECTIONS,
    TESTS,
    PairResult,
    align,
    bootstrap_cis,
    check_permutations,
    compare_families,
)

DEFAULT_METRICS = ("ndcg@10", "hr@10", "mrr@10")


@dataclass
class UnitResult:
    """One finished (method label, seed) evaluation, as the run store loads it.

    per_user: columns "user" (raw id str) + metric columns (e.g. "ndcg@10") + optional "valid".
    metrics: {"means": {metric: float}, "train_time_s": float, "eval_time_s": float,
              "validity": float | None, "info": {...}}
    """

    run_id: str
    label: str
    method: str
    seed: int
    params: dict
    per_user: pd.DataFrame
    metrics: dict


@dataclass
class LeaderboardRow:
    """One label on the leaderboard (seeds combined)."""

    letter: str
    label: str
    method: str
    seeds: list[int]
    run_ids: list[str]
    mean: dict[str, float]  # mean over users of the seed-averaged per-user values
    ci: dict[str, tuple[float, float]]  # bootstrap CI of that mean
    seed_means: dict[str, list[float]]  # each seed's mean, in seed order
    seed_sd: dict[str, float | None]  # sd (ddof=1) across seed means; None with one seed
    beats: dict[str, list[str]] = field(default_factory=dict)  # metric -> letters beaten significantly
    train_time_s: float | None = None
    train_cached: bool = False  # some seed's model came from the fitted-model cache
    eval_time_s: float | None = None
    validity: float | None = None
    notes: list[str] = field(default_factory=list)  # what a reader needs beside the numbers (per seed if they differ)


def unit_note(metrics: dict) -> str:
    """One line about how a unit produced its ranking: the method's own `leaderboard_note`
    (grounding, inference mode, LLM-stage cost) and, for two-stage methods, the retrieval hit
    rate and the first stage's own NDCG@10 on the same users."""
    info = metrics.get("info") or {}
    parts = []
    if info.get("recipe_note"):
        parts.append(str(info["recipe_note"]))
    if info.get("leaderboard_note"):
        parts.append(str(info["leaderboard_note"]))
    two = metrics.get("two_stage")
    if two:
        on_hits = (two.get("means_on_hits") or {}).get("ndcg@10")
        first_hits = (two.get("first_stage_means_on_hits") or {}).get("ndcg@10")
        first_all = (two.get("first_stage_means") or {}).get("ndcg@10")
        text = (f"first stage {two.get('first_stage')} top-{two.get('first_stage_k')}: target retrieved for "
                f"{100 * two['retrieval_hit_rate']:.1f}% of users")
        if on_hits is not None and first_hits is not None:
            text += f"; NDCG@10 on those users {on_hits:.4f} (first stage alone {first_hits:.4f})"
        if first_all is not None:
            text += f"; first stage alone on all users {first_all:.4f}"
        parts.append(text)
    return "; ".join(parts)


def row_notes(group: list) -> list[str]:
    """The notes of a label's units: one line when every seed says the same, else one per seed."""
    notes = [(u.seed, unit_note(u.metrics)) for u in group]
    distinct = {n for _, n in notes if n}
    if len(distinct) <= 1:
        return sorted(distinct)
    return [f"seed {seed}: {n}" for seed, n in notes if n]


@dataclass
class Leaderboard:
    dataset: str
    protocol: str
    header: dict
    metrics: list[str]
    primary: str
    baseline: str | None
    test: str
    correction: str
    n_permutations: int
    alpha: float
    seed: int
    confidence: float
    n_users: int
    rows: list[LeaderboardRow]  # sorted by the primary metric, best first
    pairs: dict[str, list[PairResult]]  # metric -> the tested family

    def row(self, label: str) -> LeaderboardRow:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)


def _letters(n: int) -> list[str]:
    out = []
    for i in range(n):
        name, k = "", i
        while True:
            name = string.ascii_lowercase[k % 26] + name
            k = k // 26 - 1
            if k < 0:
                break
        out.append(name)
    return out


def unit_name(unit: UnitResult) -> str:
    """How errors and the pair view name one unit."""
    return f"{unit.label} (seed {unit.seed}, run {unit.run_id})"


def unit_series(unit: UnitResult, metric: str) -> pd.Series:
    """One metric of a unit as a Series indexed by raw user id."""
    frame = unit.per_user
    if not isinstance(frame, pd.DataFrame) or "user" not in frame.columns:
        raise StoreError(
            f"run {unit.run_id!r} ({unit.label}) has no per-user table with a 'user' column; re-run its evaluation"
        )
    if metric not in frame.columns:
        raise StoreError(
            f"run {unit.run_id!r} ({unit.label}) has no per-user column {metric!r}; "
            f"it holds {', '.join(c for c in frame.columns if c != 'user')} — re-score it with that metric"
        )
    return pd.Series(frame[metric].to_numpy(dtype=np.float64), index=frame["user"].astype(str).to_numpy())


def _mean_of(values: list) -> float | None:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(kept)) if kept else None


def build_leaderboard(
    units: list[UnitResult],
    *,
    dataset: str,
    protocol: str,
    header: dict,
    metrics: Sequence[str] = DEFAULT_METRICS,
    primary: str = "ndcg@10",
    baseline: str | None = None,
    test: str = "randomization",
    correction: str = "holm",
    n_permutations: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    progress: bool = False,
) -> Leaderboard:
    """Combine seeds per label, test every pair (or every label vs `baseline`) per metric."""
    metrics = list(metrics)
    if not units:
        raise StoreError(f"no finished runs for {dataset}/{protocol}; run some methods first")
    if not metrics:
        raise ConfigError("no metrics to report; pass e.g. metrics=('ndcg@10',)")
    for m in metrics:
        parse_metric(m)
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"metrics repeat a name: {metrics}")
    if primary not in metrics:
        raise ConfigError(f"primary metric {primary!r} is not among the reported metrics {metrics}")
    if test not in TESTS:
        raise ConfigError(f"unknown test {test!r}; use one of {', '.join(TESTS)}")
    if correction not in CORRECTIONS:
        raise ConfigError(f"unknown correction {correction!r}; use one of {', '.join(CORRECTIONS)}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}")
    check_permutations(n_permutations)

    ordered = sorted(units, key=lambda u: (u.label, u.seed, u.run_id))
    seen: dict[tuple[str, int], str] = {}
    for u in ordered:
        if (u.label, u.seed) in seen:
            raise StoreError(
                f"label {u.label!r} seed {u.seed} appears twice (runs {seen[(u.label, u.seed)]!r} and {u.run_id!r}); "
                "keep one run per label and seed"
            )
        seen[(u.label, u.seed)] = u.run_id
    labels = sorted({u.label for u in ordered})
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"baseline {baseline!r} has no runs here; choose one of {', '.join(labels)}")
    by_label = {lab: [u for u in ordered if u.label == lab] for lab in labels}
    methods = {lab: sorted({u.method for u in by_label[lab]}) for lab in labels}
    for lab, ms in methods.items():
        if len(ms) > 1:
            raise StoreError(f"label {lab!r} mixes methods {ms}; give each method configuration its own label")

    # per metric: [labels, users] of seed-averaged values, plus per-seed means
    per_label: dict[str, np.ndarray] = {}
    seed_means: dict[str, dict[str, list[float]]] = {lab: {} for lab in labels}
    n_users = 0
    for m in metrics:
        users, matrix = align({unit_name(u): unit_series(u, m) for u in ordered})
        n_users = len(users)
        rows, start = [], 0
        for lab in labels:
            block = matrix[start : start + len(by_label[lab])]
            start += len(by_label[lab])
            rows.append(block.mean(axis=0))
            seed_means[lab][m] = [float(v) for v in block.mean(axis=1)]
        per_label[m] = np.stack(rows)

    means = {m: per_label[m].mean(axis=1) for m in metrics}
    order = sorted(range(len(labels)), key=lambda i: (-means[primary][i], labels[i]))
    families = compare_families(
        {m: {labels[i]: per_label[m][i] for i in order} for m in metrics},  # ranked order: A is the higher row
        pairs="all" if baseline is None else f"baseline:{baseline}",
        test=test,
        correction=correction,
        n_permutations=n_permutations,
        seed=seed,
        alpha=alpha,
        n_resamples=n_resamples,
        confidence=confidence,
        progress=progress,
    )
    # CIs of every label's mean on every metric, from one shared set of resamples
    cols = np.concatenate([per_label[m].T for m in metrics], axis=1)
    cis = bootstrap_cis(cols, n_resamples, confidence, seed).reshape(len(metrics), len(labels), 2)

    letters = dict(zip([labels[i] for i in order], _letters(len(labels))))
    rows: list[LeaderboardRow] = []
    for i in order:
        lab = labels[i]
        group = by_label[lab]
        sm = seed_means[lab]
        rows.append(
            LeaderboardRow(
                letter=letters[lab],
                label=lab,
                method=methods[lab][0],
                seeds=[u.seed for u in group],
                run_ids=[u.run_id for u in group],
                mean={m: float(means[m][i]) for m in metrics},
                ci={m: (float(cis[k, i, 0]), float(cis[k, i, 1])) for k, m in enumerate(metrics)},
                seed_means=sm,
                seed_sd={m: (float(np.std(sm[m], ddof=1)) if len(sm[m]) > 1 else None) for m in metrics},
                train_time_s=_mean_of([u.metrics.get("train_time_s") for u in group]),
                train_cached=any(bool(u.metrics.get("train_cached")) for u in group),
                eval_time_s=_mean_of([u.metrics.get("eval_time_s") for u in group]),
                validity=_mean_of([u.metrics.get("validity") for u in group]),
                notes=row_notes(group),
            )
        )
    by_name = {r.label: r for r in rows}
    for m in metrics:
        for r in rows:
            r.beats[m] = []
        for pr in families[m]:
            if not pr.significant or pr.diff == 0:
                continue
            winner, loser = (pr.a, pr.b) if pr.diff > 0 else (pr.b, pr.a)
            by_name[winner].beats[m].append(letters[loser])
        for r in rows:
            r.beats[m].sort(key=lambda s: (len(s), s))
    return Leaderboard(
        dataset=dataset,
        protocol=protocol,
        header=dict(header),
        metrics=metrics,
        primary=primary,
        baseline=baseline,
        test=test,
        correction=correction,
        n_permutations=n_permutations,
        alpha=alpha,
        seed=seed,
        confidence=confidence,
        n_users=n_users,
        rows=rows,
        pairs=families,
    )
