"""Leaderboards from finished evaluations: tables, significance markers, JSON and a plot.

Input is a list of `UnitResult` (one per method label and seed, as the run store loads
them). Seeds of one label are combined by averaging each user's value over seeds; the
paired tests, bootstrap CIs and markers run on those averaged per-user vectors, and the
spread across seeds is reported beside them. Every label must cover the identical user
set (a StoreError otherwise). Output is deterministic: same units in, same bytes out.
"""

from __future__ import annotations

import io
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark.store import atomic_write_bytes
from benchmark.errors import ConfigError, StoreError
from benchmark.scoring.metrics import parse_metric
from benchmark.scoring.stats import (
    CORRECTIONS,
    TESTS,
    PairResult,
    align,
    bootstrap_cis,
    compare_families,
    effect_size,
    paired_t_test,
    randomization_tests,
    win_tie_loss,
)

DEFAULT_METRICS = ("ndcg@10", "hr@10", "mrr@10")
_SUPERSCRIPT = dict(zip(string.ascii_lowercase, "ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖ𐞥ʳˢᵗᵘᵛʷˣʸᶻ"))
_TEST_NAMES = {"randomization": "paired two-sided randomization (sign-flip) test", "t": "paired two-sided t-test"}
_CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}


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


# ----------------------------------------------------------------------------- building


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


def _unit_name(unit: UnitResult) -> str:
    return f"{unit.label} (seed {unit.seed}, run {unit.run_id})"


def _series(unit: UnitResult, metric: str) -> pd.Series:
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
        users, matrix = align({_unit_name(u): _series(u, m) for u in ordered})
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
                notes=_row_notes(group),
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


# ----------------------------------------------------------------------------- rendering


def _sup(letters: list[str]) -> str:
    return "".join("".join(_SUPERSCRIPT.get(ch, ch) for ch in name) for name in letters)


def _fmt_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _fmt_seconds(s: float | None) -> str:
    return "—" if s is None else f"{s:.1f}"


def _fmt_header_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt_header_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_header_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _metric_cell(row: LeaderboardRow, metric: str, bold: bool) -> str:
    mean = f"{row.mean[metric]:.4f}"
    text = f"**{mean}**" if bold else mean
    sd = row.seed_sd[metric]
    if sd is not None:
        text += f" ± {sd:.4f}"
    lo, hi = row.ci[metric]
    text += f" [{lo:.4f}, {hi:.4f}]"
    return text + _sup(row.beats.get(metric, []))


def _significance_sentence(lb: Leaderboard) -> str:
    test = _TEST_NAMES[lb.test]
    if lb.test == "randomization":
        test += f" ({lb.n_permutations:,} permutations, seed {lb.seed}, p = (b+1)/(P+1))"
    family = "every pair of methods" if lb.baseline is None else f"every method against the baseline {lb.baseline!r}"
    corr = _CORRECTION_NAMES[lb.correction]
    corr_text = "without correction" if lb.correction == "none" else f"with {corr} correction across the family"
    return (
        f"{test} on per-user values of {family}, per metric, {corr_text}; "
        f"significant at alpha = {lb.alpha:g}"
    )


def _row_notes(group: list) -> list[str]:
    notes = [(u.seed, unit_note(u.metrics)) for u in group]
    distinct = {n for _, n in notes if n}
    if len(distinct) <= 1:
        return sorted(distinct)
    return [f"seed {seed}: {n}" for seed, n in notes if n]


def render_markdown(lb: Leaderboard) -> str:
    conf = f"{100 * lb.confidence:g}%"
    lines = [f"# Leaderboard: {lb.dataset} — {lb.protocol}", ""]
    for key, value in lb.header.items():
        lines.append(f"- **{key}**: {_fmt_header_value(value)}")
    lines.append(f"- **users evaluated**: {lb.n_users:,} (identical for every method)")
    lines.append(f"- **significance**: {_significance_sentence(lb)}")
    lines.append(f"- **confidence intervals**: {conf} percentile bootstrap of the mean over users")
    lines += ["", "## Results", ""]

    multi_seed = any(len(r.seeds) > 1 for r in lb.rows)
    best = {m: round(max(r.mean[m] for r in lb.rows), 4) for m in lb.metrics}
    table = []
    for r in lb.rows:
        cells = [r.letter, r.label]
        cells += [_metric_cell(r, m, round(r.mean[m], 4) == best[m]) for m in lb.metrics]
        train = _fmt_seconds(r.train_time_s) + ("*" if r.train_cached else "")
        cells += [str(len(r.seeds)), train, _fmt_seconds(r.eval_time_s)]
        cells.append("—" if r.validity is None else f"{r.validity:.3f}")
        table.append(cells)
    columns = ["", "Method"] + [m.upper() for m in lb.metrics]
    columns += ["Seeds", "Train (s)", "Eval (s)", "Validity"]
    lines.append(tabulate(table, headers=columns, tablefmt="github", disable_numparse=True))
    lines += [
        "",
        "Legend:",
        f"- Each cell: mean over users {'± sd across seed means ' if multi_seed else ''}"
        f"[{conf} bootstrap CI]; with several seeds each user's value is first averaged over seeds.",
        f"- Bold: best mean in the column. Rows are sorted by {lb.primary}.",
        "- Superscript letters: the row is significantly better than the rows with those letters on that metric "
        f"({_significance_sentence(lb)}).",
        "- Train/Eval: wall-clock seconds, mean over seeds"
        + ("; * = the fitted model was loaded from the model cache, and the time shown is that cached fit's "
           "training" if any(r.train_cached for r in lb.rows) else "")
        + ". Validity: share of generations that name a real catalog item (generative LLM methods; — otherwise).",
        "",
        f"## Pairwise comparisons on {lb.primary}",
        "",
    ]
    names = {r.label: f"{r.letter}: {r.label}" for r in lb.rows}
    pair_rows = []
    for pr in lb.pairs[lb.primary]:
        pair_rows.append(
            [
                names[pr.a],
                names[pr.b],
                f"{pr.diff:+.4f}",
                f"[{pr.ci_diff[0]:+.4f}, {pr.ci_diff[1]:+.4f}]",
                _fmt_p(pr.p_randomization),
                _fmt_p(pr.p_t),
                _fmt_p(pr.p_adjusted),
                f"{pr.effect_size:+.3f}",
                f"{pr.wins}/{pr.ties}/{pr.losses}",
                "yes" if pr.significant else "no",
            ]
        )
    corr_col = "p corrected" if lb.correction == "none" else f"p {_CORRECTION_NAMES[lb.correction]}"
    pair_cols = ["A", "B", "Δ = A − B", f"{conf} CI of Δ", "p randomization", "p t-test", corr_col]
    pair_cols += ["Effect size", "W/T/L", "Significant"]
    if pair_rows:
        lines.append(tabulate(pair_rows, headers=pair_cols, tablefmt="github", disable_numparse=True))
    else:
        lines.append("(only one method: nothing to compare)")
    lines += [
        "",
        f"Corrected p uses the {'randomization' if lb.test == 'randomization' else 't-test'} p-values. "
        "Effect size: mean(Δ) / sd(Δ) over users. W/T/L: users where A wins / ties / loses.",
        "",
        "## Runs",
        "",
    ]
    for r in lb.rows:
        runs = ", ".join(f"`{rid}` (seed {s})" for s, rid in zip(r.seeds, r.run_ids))
        lines.append(f"- {r.letter}: {r.label} ({r.method}): {runs}")
    noted = [r for r in lb.rows if r.notes]
    if noted:
        lines += ["", "## Method notes", ""]
        for r in noted:
            lines.append(f"- {r.letter}: {r.label}: " + " | ".join(r.notes))
    return "\n".join(lines) + "\n"


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, (np.floating,)):
        return _clean(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def leaderboard_dict(lb: Leaderboard) -> dict:
    """Everything on the leaderboard, with every p-value (raw and corrected) and every CI."""
    return _clean(
        {
            "dataset": lb.dataset,
            "protocol": lb.protocol,
            "header": lb.header,
            "n_users": lb.n_users,
            "metrics": lb.metrics,
            "primary": lb.primary,
            "baseline": lb.baseline,
            "test": lb.test,
            "correction": lb.correction,
            "n_permutations": lb.n_permutations,
            "alpha": lb.alpha,
            "seed": lb.seed,
            "confidence": lb.confidence,
            "rows": [
                {
                    "letter": r.letter,
                    "label": r.label,
                    "method": r.method,
                    "seeds": r.seeds,
                    "run_ids": r.run_ids,
                    "train_time_s": r.train_time_s,
                    "train_cached": r.train_cached,
                    "eval_time_s": r.eval_time_s,
                    "validity": r.validity,
                    "notes": r.notes,
                    "metrics": {
                        m: {
                            "mean": r.mean[m],
                            "ci": list(r.ci[m]),
                            "seed_means": r.seed_means[m],
                            "seed_sd": r.seed_sd[m],
                            "beats": r.beats.get(m, []),
                        }
                        for m in lb.metrics
                    },
                }
                for r in lb.rows
            ],
            "pairs": {m: [pr.to_dict() for pr in lb.pairs[m]] for m in lb.metrics},
        }
    )


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


def leaderboard_stem(dataset: str, protocol: str) -> str:
    """"<dataset>-<protocol>" with characters unsafe in file names replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{protocol}")


def write_leaderboard(lb: Leaderboard, out_dir: Path, png: bool = True) -> list[Path]:
    """Write <dataset>-<protocol>.md, .json and .png atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = leaderboard_stem(lb.dataset, lb.protocol)
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic_write_bytes(md_path, render_markdown(lb).encode("utf-8"))
    text = json.dumps(leaderboard_dict(lb), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_bytes(json_path, text.encode("utf-8"))
    paths = [md_path, json_path]
    if png:
        png_path = out_dir / f"{stem}.png"
        atomic_write_bytes(png_path, render_png(lb))
        paths.append(png_path)
    return paths


# ----------------------------------------------------------------------------- one pair


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
    name_a, name_b = _unit_name(a), _unit_name(b)
    if name_a == name_b:
        raise ConfigError(f"compare needs two different runs; both are {name_a}")
    conf = f"{100 * confidence:g}%"
    table = []
    n_users = 0
    for m in metrics:
        _, X = align({name_a: _series(a, m), name_b: _series(b, m)})
        n_users = X.shape[1]
        d = X[0] - X[1]
        ci = bootstrap_cis(np.stack([X[0], X[1], d], axis=1), n_resamples, confidence, seed)
        p_rand = float(randomization_tests(X, [(0, 1)], n_permutations, seed)[0])
        w, t, l = win_tie_loss(X[0], X[1])
        table.append(
            [
                m,
                f"{X[0].mean():.4f} [{ci[0, 0]:.4f}, {ci[0, 1]:.4f}]",
                f"{X[1].mean():.4f} [{ci[1, 0]:.4f}, {ci[1, 1]:.4f}]",
                f"{d.mean():+.4f} [{ci[2, 0]:+.4f}, {ci[2, 1]:+.4f}]",
                _fmt_p(p_rand),
                _fmt_p(paired_t_test(X[0], X[1])),
                f"{effect_size(X[0], X[1]):+.3f}",
                f"{w}/{t}/{l}",
            ]
        )
    headers = ["Metric", f"A mean [{conf} CI]", f"B mean [{conf} CI]", f"Δ = A − B [{conf} CI]"]
    headers += ["p randomization", "p t-test", "Effect size", "W/T/L"]
    lines = [
        f"A: {a.label} ({a.method}, seed {a.seed}, run {a.run_id})",
        f"B: {b.label} ({b.method}, seed {b.seed}, run {b.run_id})",
        f"{n_users:,} users in common (identical user sets). Paired two-sided tests per metric, uncorrected; "
        f"randomization test with {n_permutations:,} sign flips (seed {seed}).",
        "",
        tabulate(table, headers=headers, tablefmt="github", disable_numparse=True),
    ]
    return "\n".join(lines) + "\n"
