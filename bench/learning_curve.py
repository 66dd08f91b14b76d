"""The CPU learning curve of the generative methods: NDCG@10 against training tokens, against
MostPop and SASRec on the same users, with paired tests.

    bash bench/learning_curve.sh all          # the points (runs into ./runs)
    python bench/learning_curve.py            # leaderboards/ml-100k-learning-curve.{md,json,png} and
                                              # its evidence, leaderboards/ml-100k-learning-curve/

Each point is a finished unit labelled `<method>_<point>` (`sft_n1024`, `cft_last3`, ...;
bench/learning_curve.sh lists the commands), or a plain `sft`/`cft` unit (the leaderboard row, the
`cpu` budget itself) as the point of its example count, on ML-100K, leave-one-out, full ranking, all
test users. Units come from the run store, else from the curve's committed evidence
(leaderboards/<dataset>-learning-curve/, rewritten with every unit the report uses, so a point
outlives the run store that made it), else from the leaderboard's evidence. A point an earlier report
published without evidence is carried forward as it was, marked, outside this report's tests. For every point: the mean NDCG@10 with its 95% bootstrap CI,
the training tokens and seconds, its validation loss, the difference to MostPop (`pop`) and to
SASRec (`sasrec`, seed 0) with paired two-sided randomization tests (10,000 sign flips,
Holm-corrected across the whole family of points x baselines), and the minimum detectable
effect at 80% power. Points of the same budget in SFT and CFT are also compared (CFT − SFT).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.evidence import (  # noqa: E402
    Unit,
    evidence_index,
    local_unit,
    read_evidence,
    unit_candidate_fingerprint,
    write_evidence,
)
from benchmark.publish import collect_units  # noqa: E402
from benchmark.scoring.power import min_detectable_effect  # noqa: E402
from benchmark.scoring.stats import align, bootstrap_cis, holm, randomization_tests  # noqa: E402
from benchmark.store import RunStore, atomic_write_bytes  # noqa: E402

POINT = re.compile(r"^(?P<method>[a-z0-9]+)_(?P<point>n\d+|last\d+)$")
METRIC = "ndcg@10"
BUDGET_ROWS = ("sft", "cft")  # a plain `sft`/`cft` unit (the published row) is the point of its example count


def fail(message: str) -> NoReturn:
    """Bad input: one line naming the problem and the fix, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def gather(store: RunStore, dataset: str, protocol: str, curve_dir: Path, board_dir: Path) -> dict[tuple[str, int], Unit]:
    """Every finished unit by (label, seed): the run store's first, then the curve's own published
    evidence, then the leaderboard's (its baselines and its `sft`/`cft` rows). All on one split."""
    chosen: dict[tuple[str, int], Unit] = {}
    files, _ = collect_units(store, dataset, protocol)
    for f in files:
        u = local_unit(store, f)
        chosen[(u.label, u.seed)] = u
    for folder in (curve_dir, board_dir):
        evidence = read_evidence(folder)
        for u in evidence.units if evidence is not None else []:
            chosen.setdefault((u.label, u.seed), u)
    splits = {u.config["split_fingerprint"] for u in chosen.values()}
    if len(splits) > 1:
        fail(
            f"the run store and the published evidence ({curve_dir}/, {board_dir}/) hold units of {len(splits)} "
            f"splits ({', '.join(sorted(splits))}); a curve compares one split: rerun its points on the published split")
    return chosen


def load(units: dict[tuple[str, int], Unit], baselines: list[str]):
    series, meta, used = {}, {}, {}
    for (unit_label, seed), unit in sorted(units.items()):
        label = unit_label
        if seed == 0 and label in BUDGET_ROWS:  # the leaderboard's own row is the budget's point
            examples = (unit.metrics.get("info") or {}).get("train_examples")
            if examples is not None:
                label = f"{label}_n{int(examples)}"
        if seed != 0 or not (POINT.match(label) or label in baselines) or label in series:
            continue
        frame = unit.per_user()
        series[label] = pd.Series(frame[METRIC].to_numpy(float), index=frame["user"].astype(str).to_numpy())
        used[label] = unit
        metrics = unit.metrics
        notes = (metrics.get("info") or {}).get(label.split("_")[0]) or next(
            (v for v in (metrics.get("info") or {}).values() if isinstance(v, dict) and "train_examples" in v), {})
        meta[label] = {
            "unit": {"label": unit_label, "seed": seed},  # where its per-user values are in the evidence
            "train_examples": notes.get("train_examples"),
            "train_tokens": notes.get("train_tokens") or 0,
            "train_seconds": metrics.get("train_time_s"),
            "eval_seconds": metrics.get("eval_time_s"),
            "valid_loss": notes.get("valid_loss"),
            "validity": metrics.get("validity"),
            "coverage@10": metrics.get("coverage@10"),
            "recipe": (metrics.get("info") or {}).get("recipe_note"),
            "gradient_checkpointing": bool((unit.config.get("params") or {}).get("gradient_checkpointing")),
        }
    return series, meta, used


CARRIED = ("as first published, before the curve kept its per-user evidence (its run store did not outlive "
           "the session that made it)")


def carry_forward(report: dict, previous: dict | None) -> dict:
    """Keep what an earlier report published and this one cannot recompute, marked `carried`: points
    whose per-user values are not in the evidence, their CFT − SFT comparisons and extrapolations. A
    point rerun with evidence replaces its carried row."""
    if not previous:
        return report
    have = {r["label"] for r in report["rows"]}
    rows = [{**r, "carried": r.get("carried") or CARRIED} for r in previous.get("rows", [])
            if r["label"] not in have and r["label"] not in report["baselines"]]
    pairs = {(c["cft"], c["sft"]) for c in report["cft_vs_sft"]}
    cvs = [{**c, "carried": c.get("carried") or CARRIED} for c in previous.get("cft_vs_sft", [])
           if (c["cft"], c["sft"]) not in pairs]  # build() compares every pair whose two points it has
    methods = {e["method"] for e in report["extrapolation"]}
    ext = [{**e, "carried": e.get("carried") or CARRIED} for e in previous.get("extrapolation", [])
           if e["method"] not in methods]
    points = sorted([r for r in report["rows"] if POINT.match(r["label"])] + rows, key=lambda r: point_order(r["label"]))
    return {**report, "rows": points + [r for r in report["rows"] if r["label"] in report["baselines"]],
            "cft_vs_sft": report["cft_vs_sft"] + cvs, "extrapolation": report["extrapolation"] + ext}


def publish_evidence(folder: Path, used: dict[str, Unit], series: dict[str, pd.Series], dataset: str,
                     protocol: str, cache_dir: Path) -> None:
    """The curve's evidence folder: every unit a row of the report stands on (one per row), as a
    leaderboard keeps it (`python -m benchmark verify` recomputes each row's mean from it)."""
    units = sorted(used.values(), key=lambda u: (u.label, u.seed))
    users = sorted(set().union(*(s.index for s in series.values())))  # the per-user values load() read
    index = evidence_index(units, dataset=dataset, protocol=protocol,
                           candidate_fp=unit_candidate_fingerprint(units[0], cache_dir), users=users)
    write_evidence(folder, units, index, read_evidence(folder))


def point_order(label: str) -> tuple:
    m = POINT.match(label)
    kind = m["point"]
    return (m["method"], 0 if kind.startswith("n") else 1, int(re.sub(r"\D", "", kind)))


def build(series: dict, meta: dict, baselines: list[str], permutations: int, seed: int = 0) -> dict:
    missing = [b for b in baselines if b not in series]
    if missing:
        fail(f"neither the run store nor the published evidence holds a finished seed-0 {', '.join(missing)} unit; "
             f"run it first, e.g. `python -m benchmark run --methods {','.join(missing)}`")
    points = sorted([k for k in series if POINT.match(k)], key=point_order)
    labels = points + baselines
    users, X = align({k: series[k] for k in labels})
    idx = {k: i for i, k in enumerate(labels)}
    pairs = [(idx[p], idx[b]) for p in points for b in baselines]
    same_budget = [(idx[c], idx[s]) for c in points if c.startswith("cft_")
                   for s in [c.replace("cft_", "sft_", 1)] if s in idx]
    raw = randomization_tests(X, pairs + same_budget, permutations, seed)
    adjusted = holm(raw[: len(pairs)])
    cis = bootstrap_cis(X.T, 10_000, 0.95, seed)
    rows = []
    for k in labels:
        i = idx[k]
        row = {"label": k, "mean": float(X[i].mean()), "ci": [float(cis[i, 0]), float(cis[i, 1])], **meta.get(k, {})}
        for j, (a, b) in enumerate(pairs):
            if a == i:
                d = X[a] - X[b]
                row[f"vs_{labels[b]}"] = {"diff": float(d.mean()), "p": float(raw[j]), "p_holm": float(adjusted[j]),
                                          "mde": float(min_detectable_effect(float(d.std(ddof=1)), len(d)))}
        rows.append(row)
    cft_vs_sft = []
    for j, (a, b) in enumerate(same_budget):
        d = X[a] - X[b]
        cft_vs_sft.append({"cft": labels[a], "sft": labels[b], "diff": float(d.mean()), "p": float(raw[len(pairs) + j]),
                           "mde": float(min_detectable_effect(float(d.std(ddof=1)), len(d)))})
    extrapolation = [e for m in ("sft", "cft") if (e := extrapolate(m, labels, X, meta, baselines[0], seed))]
    return {"metric": METRIC, "n_users": int(len(users)), "baselines": baselines, "permutations": permutations,
            "rows": rows, "cft_vs_sft": cft_vs_sft, "extrapolation": extrapolation}


def extrapolate(method: str, labels: list[str], X: np.ndarray, meta: dict, target: str, seed: int,
                n_boot: int = 2000) -> dict | None:
    """Training tokens at which a line through the trained example-count points (`nN`, N > 0),
    NDCG@10 against log10(tokens), reaches `target`'s mean; its 95% interval from resampling users
    (every point and the target resampled together, so their pairing is kept). A `lastN` point changes
    which examples train, not only how many, so it stays off the line. Needs two trained points; an
    assumption, not a fit of how learning really goes beyond the last point."""
    pts = [(i, float(meta.get(k, {}).get("train_tokens") or 0)) for i, k in enumerate(labels)
           if (m := POINT.match(k)) and m["method"] == method and m["point"].startswith("n")]
    pts = [(i, t) for i, t in pts if t > 0]
    if len(pts) < 2 or target not in labels:
        return None
    rows = [i for i, _ in pts]
    x = np.log10([t for _, t in pts])
    j = labels.index(target)

    def crossing(means: np.ndarray, goal: float) -> float:  # log10 tokens; inf where the line never gets there
        slope, intercept = np.polyfit(x, means, 1)
        return float("inf") if slope <= 0 else float((goal - intercept) / slope)

    def tokens(log10: float) -> float | None:  # None: never (strict JSON has no infinity)
        return None if log10 > 300 else float(10**log10)

    n = X.shape[1]
    point = crossing(X[rows].mean(axis=1), float(X[j].mean()))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        boots.append(crossing(X[rows][:, idx].mean(axis=1), float(X[j, idx].mean())))
    boots = np.asarray(boots)
    lo, hi = np.quantile(boots, [0.025, 0.975], method="nearest")  # no interpolation across inf
    return {"method": method, "target": target, "points": [labels[i] for i in rows], "tokens": tokens(point),
            "ci": [tokens(lo), tokens(hi)], "share_never": float(np.mean(~np.isfinite(boots))), "n_boot": n_boot}


def render_markdown(report: dict, dataset: str) -> str:
    b = report["baselines"]
    lines = [
        f"# Learning curve: {dataset}, leave-one-out, full ranking, {report['n_users']:,} test users",
        "",
        "NDCG@10 of SFT and CFT as their CPU training budget grows, beside MostPop and SASRec on the same users.",
        "Every point is the methods' `cpu` budget (full fine-tuning, bf16 where the CPU has it, batch 64, lr 1e-4,",
        "one epoch) with one more departure, its number of training examples (`nN`) or each user's latest",
        "training item for three epochs (`last3`); the commands are in `bench/learning_curve.sh`, and the",
        "point of the budget itself (`n2048`) is the leaderboard's `sft`/`cft` row (`bench/republish.sh`).",
        "Train tokens: real tokens through the model's forward and backward passes in training; CFT's include",
        "its counterfactual copy of each example (the same example with the history removed), about a third more than SFT's.",
        "Validity: share of generated titles that name a real catalog item; Cov@10: share of the catalog in some top-10.",
        "Valid loss: SFT's token cross-entropy on the validation users' answers; CFT's is the reference's",
        "token-weighted cross-entropy (weights falling from 1 to beta along the answer), so they do not compare across methods.",
        f"p: paired two-sided randomization test ({report['permutations']:,} sign flips); p_Holm: Holm across all",
        "points x baselines; MDE: the smallest difference detectable with 80% power at alpha 0.05.",
        "",
        "| point | examples | train tokens | train s | valid loss | validity | Cov@10 | NDCG@10 [95% CI] | "
        + " | ".join(f"Δ vs {x} (p_Holm; MDE)" for x in b) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(b),
    ]
    for r in report["rows"]:
        if r["label"] in b or r.get("carried"):
            continue
        cells = [r["label"], str(r.get("train_examples") or 0), f"{int(r.get('train_tokens') or 0):,}",
                 "—" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}",
                 "—" if r.get("valid_loss") is None else f"{r['valid_loss']:.3f}",
                 "—" if r.get("validity") is None else f"{r['validity']:.3f}",
                 "—" if r.get("coverage@10") is None else f"{r['coverage@10']:.3f}",
                 f"{r['mean']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"]
        for x in b:
            v = r[f"vs_{x}"]
            cells.append(f"{v['diff']:+.4f} ({v['p_holm']:.4f}; {v['mde']:.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    checkpointed = [r["label"] for r in report["rows"] if r.get("gradient_checkpointing") and not r.get("carried")]
    if checkpointed:
        lines += ["", "Trained with gradient checkpointing (`--set <label>.gradient_checkpointing=true`, a harness setting "
                  "that saves memory so two LLM jobs fit in 24 GB and leaves the unit key alone): "
                  + ", ".join(checkpointed) + "."]
    lines += ["", "Baselines (seed 0): " + "; ".join(
        f"{r['label']} {r['mean']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]" for r in report["rows"] if r["label"] in b)]
    carried = [r for r in report["rows"] if r.get("carried")]
    if carried:
        lines += ["", "Points without per-user evidence (†): " + carried[0]["carried"] + ". They are shown as first "
                  "published, with that report's tests (its Holm family), and take no part in this report's tests, "
                  "CFT − SFT or extrapolation; `bash bench/learning_curve.sh` reruns them, and the rerun point then "
                  "replaces its row here.", "",
                  "| point † | examples | train tokens | train s | validity | NDCG@10 [95% CI] | "
                  + " | ".join(f"Δ vs {x} (p_Holm then)" for x in b) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(b)]
        for r in carried:
            cells = [r["label"], str(r.get("train_examples") or 0), f"{int(r.get('train_tokens') or 0):,}",
                     "—" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}",
                     "—" if r.get("validity") is None else f"{r['validity']:.3f}",
                     f"{r['mean']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"]
            cells += [f"{r[f'vs_{x}']['diff']:+.4f} ({r[f'vs_{x}']['p_holm']:.4f})" if f"vs_{x}" in r else "—" for x in b]
            lines.append("| " + " | ".join(cells) + " |")
    if report["cft_vs_sft"]:
        lines += ["", "CFT − SFT at the same budget (uncorrected p; MDE at 80% power; † as first published):", ""]
        lines += [f"- {c['cft']} − {c['sft']}{' †' if c.get('carried') else ''}: {c['diff']:+.4f} "
                  f"(p {c['p']:.4f}; MDE {c['mde']:.4f})" for c in report["cft_vs_sft"]]
    for e in report.get("extrapolation", []):
        def fmt(t: float | None) -> str:
            return "never (slope <= 0)" if t is None else f"{t:,.0f}" if t < 1e9 else f"{t:.1e}"
        lines += ["", f"Extrapolation{' † (as first published)' if e.get('carried') else ''} ({e['method'].upper()}, a line through {', '.join(e['points'])}: NDCG@10 against "
                  f"log10(training tokens)): it reaches {e['target']}'s mean at {fmt(e['tokens'])} training tokens, 95% "
                  f"interval {fmt(e['ci'][0])} to {fmt(e['ci'][1])} ({e['n_boot']:,} user resamples; "
                  f"{e['share_never']:.1%} of them never reach it). A straight line in log tokens through "
                  f"{len(e['points'])} points is an assumption, not a measurement of what lies beyond them."]
    lines.append("")
    return "\n".join(lines)


def render_png(report: dict, dataset: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in report["rows"] if r["label"] not in report["baselines"]]
    positive = [r["train_tokens"] for r in rows if r.get("train_tokens")]
    zero_at = (min(positive) / 4) if positive else 1.0
    for method, color in (("sft", "#1f77b4"), ("cft", "#d62728")):
        mine = sorted([r for r in rows if r["label"].startswith(method + "_")], key=lambda r: r.get("train_tokens") or 0)
        if not mine:
            continue
        x = np.array([r.get("train_tokens") or zero_at for r in mine], dtype=float)
        y = np.array([r["mean"] for r in mine])
        lo = y - np.array([r["ci"][0] for r in mine])
        hi = np.array([r["ci"][1] for r in mine]) - y
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o-", color=color, capsize=3, label=method.upper())
        hollow = [i for i, r in enumerate(mine) if r.get("carried")]
        if hollow:  # points without per-user evidence: drawn open
            ax.plot(x[hollow], y[hollow], "o", color=color, markerfacecolor="white", zorder=3)
        for xi, yi, r in zip(x, y, mine):
            ax.annotate(r["label"].split("_", 1)[1], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if any(r.get("carried") for r in rows):
        ax.plot([], [], "o", color="#444444", markerfacecolor="white", label="† as first published (no evidence)")
    for r, style in zip([r for r in report["rows"] if r["label"] in report["baselines"]], ("--", ":")):
        ax.axhspan(r["ci"][0], r["ci"][1], color="#999999", alpha=0.15)
        ax.axhline(r["mean"], color="#444444", linestyle=style, label=f"{r['label']} (95% CI band)")
    ax.set_xscale("log")
    # 1-2-5 ticks with plain numbers: matplotlib's labelled minor ticks overlap on a short log range
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"training tokens (log; zero-shot drawn at {zero_at:,.0f})")
    ax.set_ylabel(f"NDCG@10, {report['n_users']:,} users, 95% CI")
    ax.set_title(f"{dataset}: CPU learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--protocol", default="loo-full")
    ap.add_argument("--baselines", default="pop,sasrec")
    ap.add_argument("--permutations", type=int, default=10_000)
    ap.add_argument("--out", default="leaderboards")
    args = ap.parse_args()
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    store = RunStore(args.runs_dir)
    stem = Path(args.out) / f"{args.dataset}-learning-curve"
    units = gather(store, args.dataset, args.protocol, stem, Path(args.out) / f"{args.dataset}-{args.protocol}")
    series, meta, used = load(units, baselines)
    previous = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else None
    report = carry_forward(build(series, meta, baselines, args.permutations), previous)
    publish_evidence(stem, used, series, args.dataset, args.protocol, store.cache_dir)
    atomic_write_bytes(stem.with_suffix(".md"), render_markdown(report, args.dataset).encode())
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(stem.with_suffix(".png"), render_png(report, args.dataset))
    print(render_markdown(report, args.dataset))


if __name__ == "__main__":
    main()
