"""A built leaderboard as markdown and JSON, and the files `--publish` writes.

Compute apart from presentation (as ranx's report): `benchmark.leaderboard` builds, this
module renders; the PNGs are drawn by `benchmark.plots`. Same leaderboard in, same bytes out.
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from benchmark.leaderboard import Leaderboard, LeaderboardRow
from benchmark.plots import render_cost_png, render_png
from benchmark.scoring.power import POWER
from benchmark.store import atomic_write_bytes

_SUPERSCRIPT = dict(zip(string.ascii_lowercase, "ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖ𐞥ʳˢᵗᵘᵛʷˣʸᶻ"))
_TEST_NAMES = {"randomization": "paired two-sided randomization (sign-flip) test", "t": "paired two-sided t-test"}
_CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}


def _sup(letters: list[str]) -> str:
    return "".join("".join(_SUPERSCRIPT.get(ch, ch) for ch in name) for name in letters)


def format_p(p: float) -> str:
    """A p-value with four decimals, or in e-notation below 1e-4; — when missing."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def format_mde(mde: float, underpowered: bool) -> str:
    """The MDE with a dagger when the observed difference is below it (underpowered)."""
    if mde is None or not math.isfinite(mde):
        return "—"
    return f"{mde:.4f}" + (" †" if underpowered else "")


def mde_sentence(alpha: float) -> str:
    """The legend of the MDE column: what it is, how it is computed, what † means."""
    return (
        f"MDE: the smallest |Δ| that a paired two-sided t-test at alpha = {alpha:g} (uncorrected) detects with "
        f"{100 * POWER:g}% power, from the observed sd of Δ over the n users (exact noncentral t); "
        "† = underpowered: the observed |Δ| is below its MDE, so \"not significant\" there does not mean "
        "\"no difference\"."
    )


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


def render_markdown(lb: Leaderboard) -> str:
    conf = f"{100 * lb.confidence:g}%"
    stem = leaderboard_stem(lb.dataset, lb.protocol)
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
                format_p(pr.p_randomization),
                format_p(pr.p_t),
                format_p(pr.p_adjusted),
                f"{pr.effect_size:+.3f}",
                f"{pr.wins}/{pr.ties}/{pr.losses}",
                format_mde(pr.mde, pr.underpowered),
                "yes" if pr.significant else "no",
            ]
        )
    corr_col = "p corrected" if lb.correction == "none" else f"p {_CORRECTION_NAMES[lb.correction]}"
    pair_cols = ["A", "B", "Δ = A − B", f"{conf} CI of Δ", "p randomization", "p t-test", corr_col]
    pair_cols += ["Effect size", "W/T/L", f"MDE ({100 * POWER:g}% power)", "Significant"]
    if pair_rows:
        lines.append(tabulate(pair_rows, headers=pair_cols, tablefmt="github", disable_numparse=True))
    else:
        lines.append("(only one method: nothing to compare)")
    lines += [
        "",
        f"Corrected p uses the {'randomization' if lb.test == 'randomization' else 't-test'} p-values. "
        "Effect size: mean(Δ) / sd(Δ) over users. W/T/L: users where A wins / ties / loses. " + mde_sentence(lb.alpha),
        "",
        f"Quality against cost (training + evaluation time): [{stem}-cost.png]({stem}-cost.png).",
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


def leaderboard_stem(dataset: str, protocol: str) -> str:
    """"<dataset>-<protocol>" with characters unsafe in file names replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{protocol}")


def write_leaderboard(lb: Leaderboard, out_dir: Path, png: bool = True) -> list[Path]:
    """Write <dataset>-<protocol>.md, .json, .png and -cost.png atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = leaderboard_stem(lb.dataset, lb.protocol)
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic_write_bytes(md_path, render_markdown(lb).encode("utf-8"))
    text = json.dumps(leaderboard_dict(lb), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_bytes(json_path, text.encode("utf-8"))
    paths = [md_path, json_path]
    if png:
        for path, draw in ((out_dir / f"{stem}.png", render_png), (out_dir / f"{stem}-cost.png", render_cost_png)):
            atomic_write_bytes(path, draw(lb))
            paths.append(path)
    return paths
