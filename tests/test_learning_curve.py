"""bench/learning_curve.py: the published learning-curve report's tests and extrapolation,
checked against scipy's regression and statsmodels' Holm correction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

_PATH = Path(__file__).resolve().parents[1] / "bench" / "learning_curve.py"
_SPEC = importlib.util.spec_from_file_location("learning_curve", _PATH)
lc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lc)

N_USERS = 60


def per_user(mean: float, rng: np.random.Generator, spread: float = 0.05) -> np.ndarray:
    """Per-user values whose mean is exactly `mean` (centred noise)."""
    noise = rng.normal(0.0, spread, N_USERS)
    return mean + noise - noise.mean()


def curve(means: dict[str, float], tokens: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    users = [str(u) for u in range(N_USERS)]
    series = {k: pd.Series(per_user(m, rng), index=users) for k, m in means.items()}
    meta = {k: {"train_tokens": t} for k, t in tokens.items()}
    return series, meta


def test_the_extrapolation_meets_the_target_where_scipys_fitted_line_does():
    tokens = {"sft_n0": 0, "sft_n8": 1_000, "sft_n32": 10_000, "sft_n128": 100_000}
    means = {"sft_n0": 0.001, "sft_n8": 0.010, "sft_n32": 0.016, "sft_n128": 0.025, "pop": 0.045, "sasrec": 0.1}
    series, meta = curve(means, tokens)
    report = lc.build(series, meta, ["pop", "sasrec"], permutations=500)
    (e,) = report["extrapolation"]
    fit = stats.linregress(np.log10([1_000, 10_000, 100_000]), [0.010, 0.016, 0.025])
    expected = 10 ** ((0.045 - fit.intercept) / fit.slope)
    assert e["method"] == "sft" and e["target"] == "pop"
    assert e["points"] == ["sft_n8", "sft_n32", "sft_n128"]  # zero-shot has no log tokens: off the line
    assert e["tokens"] == pytest.approx(expected, rel=1e-9)
    lo, hi = e["ci"]
    assert lo is not None and lo < e["tokens"] and (hi is None or hi > e["tokens"])


def test_a_last_items_point_stays_off_the_line_of_example_counts():
    tokens = {"sft_n8": 1_000, "sft_n32": 10_000, "sft_last3": 50_000}
    means = {"sft_n8": 0.010, "sft_n32": 0.020, "sft_last3": 0.002, "pop": 0.045, "sasrec": 0.1}
    series, meta = curve(means, tokens)
    (e,) = lc.build(series, meta, ["pop", "sasrec"], permutations=200)["extrapolation"]
    assert e["points"] == ["sft_n8", "sft_n32"]
    assert e["tokens"] == pytest.approx(10 ** (np.log10(1_000) + (0.045 - 0.010) / 0.010), rel=1e-9)


def test_a_falling_line_never_reaches_the_target():
    tokens = {"cft_n8": 1_000, "cft_n32": 10_000}
    means = {"cft_n8": 0.020, "cft_n32": 0.010, "pop": 0.045, "sasrec": 0.1}
    series, meta = curve(means, tokens)
    (e,) = lc.build(series, meta, ["pop", "sasrec"], permutations=200)["extrapolation"]
    assert e["method"] == "cft" and e["tokens"] is None  # never: strict JSON has no infinity
    assert e["share_never"] > 0.5


def test_points_against_baselines_are_holm_corrected_as_statsmodels_does_and_cft_meets_sft_at_its_budget():
    tokens = {"sft_n8": 1_000, "cft_n8": 1_300, "sft_n32": 4_000}
    means = {"sft_n8": 0.030, "cft_n8": 0.034, "sft_n32": 0.044, "pop": 0.045, "sasrec": 0.1}
    series, meta = curve(means, tokens, seed=3)
    report = lc.build(series, meta, ["pop", "sasrec"], permutations=2_000)
    rows = {r["label"]: r for r in report["rows"]}
    assert [r["label"] for r in report["rows"]] == ["cft_n8", "sft_n8", "sft_n32", "pop", "sasrec"]
    tests = [rows[p][f"vs_{b}"] for p in ("cft_n8", "sft_n8", "sft_n32") for b in ("pop", "sasrec")]
    _, expected, _, _ = multipletests([t["p"] for t in tests], method="holm")
    assert [t["p_holm"] for t in tests] == pytest.approx(expected.tolist(), abs=1e-12)
    assert rows["sft_n32"]["vs_pop"]["diff"] == pytest.approx(0.044 - 0.045, abs=1e-12)
    (pair,) = report["cft_vs_sft"]  # only the budget both methods ran
    assert (pair["cft"], pair["sft"]) == ("cft_n8", "sft_n8")
    assert pair["diff"] == pytest.approx(0.004, abs=1e-12)


def test_the_report_renders_every_point_and_names_its_extrapolation():
    tokens = {"sft_n8": 1_000, "sft_n32": 10_000}
    series, meta = curve({"sft_n8": 0.010, "sft_n32": 0.020, "pop": 0.045, "sasrec": 0.1}, tokens)
    report = lc.build(series, meta, ["pop", "sasrec"], permutations=200)
    text = lc.render_markdown(report, "toy")
    assert "| sft_n8 |" in text and "| sft_n32 |" in text
    assert "Extrapolation (SFT, a line through sft_n8, sft_n32" in text
    assert lc.render_png(report, "toy").startswith(b"\x89PNG")
