"""bench/learning_curve.py: the published learning-curve report's tests and extrapolation,
checked against scipy's regression and statsmodels' Holm correction."""

from __future__ import annotations

import importlib.util
import json
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


def test_a_point_without_evidence_is_carried_forward_marked_until_a_rerun_replaces_it():
    tokens = {"sft_n8": 1_000, "sft_n32": 10_000, "cft_n8": 1_300}
    series, meta = curve({"sft_n8": 0.010, "sft_n32": 0.020, "cft_n8": 0.011, "pop": 0.045, "sasrec": 0.1}, tokens)
    earlier = lc.build(series, meta, ["pop", "sasrec"], permutations=200)
    # the next report has lost sft_n8's per-user values (and so CFT − SFT at n8 and SFT's line)
    now = {k: v for k, v in series.items() if k != "sft_n8"}
    report = lc.carry_forward(lc.build(now, meta, ["pop", "sasrec"], permutations=200), earlier)
    by = {r["label"]: r for r in report["rows"]}
    assert by["sft_n8"]["carried"] and by["sft_n8"]["mean"] == pytest.approx(0.010)
    assert not by["sft_n32"].get("carried") and not by["pop"].get("carried")
    assert [c["cft"] for c in report["cft_vs_sft"] if c.get("carried")] == ["cft_n8"]
    assert [e["method"] for e in report["extrapolation"] if e.get("carried")] == ["sft"]
    text = lc.render_markdown(report, "toy")
    main_table, carried_table = text.split("Points without per-user evidence")
    assert "| sft_n8 |" in carried_table and "| sft_n8 |" not in main_table
    assert "Extrapolation † (as first published) (SFT" in text and "cft_n8 − sft_n8 †" in text
    assert lc.render_png(report, "toy").startswith(b"\x89PNG")
    # carried twice stays carried once, unchanged; a rerun (evidence again) replaces the row
    assert lc.carry_forward(lc.build(now, meta, ["pop", "sasrec"], permutations=200), report)["rows"] == report["rows"]
    again = lc.carry_forward(earlier, report)
    assert not any(r.get("carried") for r in again["rows"] + again["cft_vs_sft"] + again["extrapolation"])


def test_the_curve_keeps_its_evidence_so_it_outlives_the_run_store_and_verifies(tmp_path, capsys, monkeypatch):
    """End to end on the synthetic dataset (cheap stand-in methods under point labels): the report
    writes leaderboards/<dataset>-learning-curve/ with every unit it used; with the run store deleted
    the same report comes back from that evidence, and `verify` recomputes each row's mean from it."""
    from benchmark.cli import main as cli_main

    runs, out = tmp_path / "runs", tmp_path / "leaderboards"
    assert cli_main(["--runs-dir", str(runs), "run", "--methods", "pop,sasrec=pop,sft_n8=random,sft_n32=pop",
                     "--dataset", "synthetic", "--quiet"]) == 0
    argv = ["learning_curve.py", "--runs-dir", str(runs), "--dataset", "synthetic", "--out", str(out),
            "--permutations", "200"]
    monkeypatch.setattr("sys.argv", argv)
    lc.main()
    stem = out / "synthetic-learning-curve"
    first = {p: (stem.parent / p).read_bytes() for p in ("synthetic-learning-curve.md", "synthetic-learning-curve.json")}
    assert sorted(p.name for p in (stem / "units").iterdir()) == ["pop", "sasrec", "sft_n32", "sft_n8"]
    assert (stem / "runs").is_dir() and list((stem / "runs").glob("*.json"))  # the run manifest is kept

    import shutil

    shutil.rmtree(runs)
    lc.main()
    assert {p: (stem.parent / p).read_bytes() for p in first} == first
    capsys.readouterr()
    assert cli_main(["--runs-dir", str(runs), "verify", str(stem)]) == 0
    assert f"ok  {stem}: 4 unit(s), 4 leaderboard row(s)" in capsys.readouterr().out

    # a hand-edited mean in the report is caught
    report = json.loads((stem.parent / "synthetic-learning-curve.json").read_text())
    report["rows"][0]["mean"] += 0.01
    (stem.parent / "synthetic-learning-curve.json").write_text(json.dumps(report))
    assert cli_main(["--runs-dir", str(runs), "verify", str(stem)]) == 2
    assert "but its per-user values give" in capsys.readouterr().err


def test_a_missing_baseline_is_one_error_line_and_exit_code_2(capsys):
    series, meta = curve({"sft_n8": 0.010, "pop": 0.045}, {"sft_n8": 1_000})
    with pytest.raises(SystemExit) as exc:
        lc.build(series, meta, ["pop", "sasrec"], permutations=100)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "sasrec" in err[0] and "python -m benchmark run" in err[0]
