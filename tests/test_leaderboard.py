"""Leaderboard building and rendering on synthetic results (3 labels x 2 seeds, 200 users)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmark.errors import ConfigError, StoreError
from benchmark.compare import compare_units
from benchmark.leaderboard import UnitResult, build_leaderboard
from benchmark.render import render_markdown, write_leaderboard
from benchmark.scoring.stats import holm, randomization_tests

N_USERS = 200
METRICS = ("ndcg@10", "hr@10", "mrr@10")
HEADER = {
    "dataset": {"users": 200, "items": 50, "interactions": 4000},
    "split": "leave-one-out, full-catalog candidates",
    "seeds": "0, 1",
    "date": "2026-01-01",
    "package version": "0.1.0",
    "git commit": "abc1234",
}
PERM = 999


def _unit(label, method, seed, quality, users, validity=None):
    rng = np.random.default_rng(1000 * seed + sum(map(ord, label)))
    hit = rng.random(len(users)) < quality
    rank = rng.integers(1, 11, len(users))
    ndcg = np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0)
    mrr = np.where(hit, 1.0 / rank, 0.0)
    frame = pd.DataFrame({"user": users, "ndcg@10": ndcg, "hr@10": hit.astype(float), "mrr@10": mrr})
    means = {m: float(frame[m].mean()) for m in METRICS}
    return UnitResult(
        run_id=f"{label}-s{seed}",
        label=label,
        method=method,
        seed=seed,
        params={"q": quality},
        per_user=frame,
        metrics={"means": means, "train_time_s": 10.0 + seed, "eval_time_s": 2.0, "validity": validity, "info": {}},
    )


def _units(users=None):
    users = users if users is not None else [f"u{i}" for i in range(N_USERS)]
    out = []
    for seed in (0, 1):
        out.append(_unit("strong", "sasrec", seed, 0.8, users))
        out.append(_unit("weak-a", "pop", seed, 0.2, users))
        out.append(_unit("weak-b", "sft", seed, 0.22, users, validity=0.9 + 0.02 * seed))
    return out


def _build(units, **kw):
    return build_leaderboard(
        units, dataset="toy", protocol="loo-full", header=HEADER, metrics=METRICS, n_permutations=PERM, **kw
    )


@pytest.fixture(scope="module")
def board():
    return _build(_units())


def test_ordering_letters_and_markers(board):
    assert board.rows[0].label == "strong"
    assert [r.letter for r in board.rows] == ["a", "b", "c"]
    assert board.n_users == N_USERS
    strong = board.rows[0]
    for m in METRICS:
        assert strong.beats[m] == ["b", "c"]  # clearly better than both weak methods
    # the two weak methods are close: neither beats the strong one
    for r in board.rows[1:]:
        assert "a" not in r.beats["ndcg@10"]
    assert strong.seeds == [0, 1] and strong.run_ids == ["strong-s0", "strong-s1"]
    assert strong.train_time_s == pytest.approx(10.5)
    assert board.row("weak-b").validity == pytest.approx(0.91)
    assert board.row("weak-a").validity is None


def test_seeds_are_averaged_per_user(board):
    units = _units()
    s0, s1 = (u for u in units if u.label == "strong")
    for m in METRICS:
        avg = (s0.per_user[m].to_numpy() + s1.per_user[m].to_numpy()) / 2
        assert board.row("strong").mean[m] == pytest.approx(avg.mean())
        seed_means = [s0.per_user[m].mean(), s1.per_user[m].mean()]
        assert board.row("strong").seed_means[m] == pytest.approx(seed_means)
        assert board.row("strong").seed_sd[m] == pytest.approx(np.std(seed_means, ddof=1))
        lo, hi = board.row("strong").ci[m]
        assert lo < avg.mean() < hi


def test_markdown_has_bold_markers_legend_pairs_and_runs(board):
    md = render_markdown(board)
    lines = md.splitlines()
    strong_line = next(line for line in lines if line.startswith("| a ") and "strong" in line)
    assert strong_line.count("**") == 2 * len(METRICS)  # best in every metric column
    assert "ᵇᶜ" in strong_line
    assert " ± " in strong_line  # two seeds -> sd across seeds
    weak_a_line = next(line for line in lines if "| weak-a" in line)
    assert "**" not in weak_a_line and "—" in weak_a_line  # no validity for a non-LLM method
    assert "0.910" in next(line for line in lines if "| weak-b" in line)
    assert "- **git commit**: abc1234" in md
    assert "- **dataset**: users: 200, items: 50, interactions: 4000" in md
    assert "Holm" in md and "999 permutations" in md and "Legend" in md
    assert "## Pairwise comparisons on ndcg@10" in md
    assert "`strong-s1` (seed 1)" in md


def test_json_p_values_match_stats_functions(tmp_path, board):
    paths = write_leaderboard(board, tmp_path)
    assert [p.name for p in paths] == ["toy-loo-full.md", "toy-loo-full.json", "toy-loo-full.png", "toy-loo-full-cost.png"]
    data = json.loads(paths[1].read_text())
    labels = sorted(["strong", "weak-a", "weak-b"])
    units = _units()
    order = np.argsort(units[0].per_user["user"].to_numpy())  # the leaderboard sorts users by raw id
    for m in METRICS:
        X = np.stack(
            [
                np.mean([u.per_user[m].to_numpy()[order] for u in units if u.label == lab], axis=0)
                for lab in labels
            ]
        )
        got = data["pairs"][m]
        # pairs follow the ranked rows (A is the higher row): a-b, a-c, b-c
        ranked = [r["label"] for r in data["rows"]]
        assert [(p["a"], p["b"]) for p in got] == [(ranked[0], ranked[1]), (ranked[0], ranked[2]), (ranked[1], ranked[2])]
        pairs = [(labels.index(p["a"]), labels.index(p["b"])) for p in got]
        raw = randomization_tests(X, pairs, PERM, 0)
        np.testing.assert_allclose([p["p_randomization"] for p in got], raw)
        np.testing.assert_allclose([p["p_adjusted"] for p in got], holm(raw))
        assert all(len(p["ci_diff"]) == 2 and p["ci_diff"][0] <= p["diff"] <= p["ci_diff"][1] for p in got)
    assert data["rows"][0]["metrics"]["ndcg@10"]["beats"] == ["b", "c"]
    assert paths[2].read_bytes()[:8] == paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_output_bytes_are_deterministic(tmp_path):
    first = write_leaderboard(_build(_units()), tmp_path / "one")
    shuffled = list(reversed(_units()))  # input order must not matter either
    second = write_leaderboard(_build(shuffled), tmp_path / "two")
    for p1, p2 in zip(first, second):
        assert p1.read_bytes() == p2.read_bytes(), p1.name


def test_user_mismatch_raises_store_error():
    units = _units()
    users = [f"u{i}" for i in range(N_USERS - 1)] + ["someone-else"]
    units[1] = _unit("weak-a", "pop", 0, 0.2, users)
    with pytest.raises(StoreError, match="different users: 1 user"):
        _build(units)


def test_bad_inputs():
    units = _units()
    with pytest.raises(ConfigError):
        _build(units, primary="ndcg@20")
    with pytest.raises(ConfigError):
        _build(units, baseline="nope")
    with pytest.raises(StoreError, match="appears twice"):
        _build(units + [units[0]])
    with pytest.raises(StoreError, match="no per-user column 'recall@10'"):
        build_leaderboard(units, dataset="toy", protocol="loo", header={}, metrics=("recall@10",), primary="recall@10")
    with pytest.raises(StoreError):
        _build([])


def test_baseline_family_only_marks_against_baseline():
    lb = _build(_units(), baseline="weak-a")
    assert {(p.a, p.b) for p in lb.pairs["ndcg@10"]} == {("strong", "weak-a"), ("weak-b", "weak-a")}
    assert lb.row("strong").beats["ndcg@10"] == [lb.row("weak-a").letter]


def test_compare_units_renders_every_metric():
    units = _units()
    text = compare_units(units[0], units[1], METRICS, n_permutations=PERM, n_resamples=500)
    assert "A: strong (sasrec, seed 0, run strong-s0)" in text
    for m in METRICS:
        assert f"| {m}" in text
    assert "200 users" in text and "p randomization" in text
    bad = _unit("weak-a", "pop", 0, 0.2, [f"v{i}" for i in range(N_USERS)])
    with pytest.raises(StoreError):
        compare_units(units[0], bad, METRICS, n_permutations=PERM, n_resamples=500)


def test_method_notes_show_two_stage_hit_rate_and_method_notes():
    units = _units()
    two_stage = {"first_stage": "sasrec", "first_stage_k": 20, "retrieval_hit_rate": 0.25,
                 "means_on_hits": {"ndcg@10": 0.41}, "first_stage_means_on_hits": {"ndcg@10": 0.38},
                 "first_stage_means": {"ndcg@10": 0.095}}
    for u in units:
        if u.label == "weak-b":
            u.metrics = {**u.metrics, "two_stage": two_stage, "info": {"leaderboard_note": "reranks top-20"}}
    board = _build(units)
    assert board.row("weak-b").notes == [
        "reranks top-20; first stage sasrec top-20: target retrieved for 25.0% of users; NDCG@10 on those users "
        "0.4100 (first stage alone 0.3800); first stage alone on all users 0.0950"
    ]
    assert board.row("strong").notes == []
    md = render_markdown(board)
    assert "## Method notes" in md and "target retrieved for 25.0% of users" in md


def test_cached_fit_is_marked_in_the_train_column():
    units = _units()
    for u in units:
        if u.label == "strong":
            u.metrics = {**u.metrics, "train_cached": u.seed == 1}
    board = _build(units)
    assert board.row("strong").train_cached and not board.row("weak-a").train_cached
    md = render_markdown(board)
    assert "| 10.5*" in md and "loaded from the model cache" in md
    assert "loaded from the model cache" not in render_markdown(_build(_units()))


def test_cost_plot_is_written_beside_the_leaderboard_png_and_tolerates_missing_times():
    from benchmark.plots import render_cost_png

    board = _build(_units())
    first = render_cost_png(board)
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and render_cost_png(_build(_units())) == first
    board.row("weak-b").train_time_s = board.row("weak-b").eval_time_s = None  # left out, named under the axis
    board.row("weak-a").train_time_s, board.row("weak-a").eval_time_s = 0.0, 0.0  # drawn at the floor
    second = render_cost_png(board)
    assert second[:8] == b"\x89PNG\r\n\x1a\n" and second != first
    assert "-cost.png](toy-loo-full-cost.png)" in render_markdown(board)


def test_cost_plot_labels_of_nearby_points_do_not_overlap():
    from benchmark.plots import label_steps

    # the published ML-100K case: sasrec, p2rec and sasrec_v1 within half a decade and 0.006 NDCG
    x = np.array([1047.0, 977.0, 437.0, 0.15, 4300.0])
    y = np.array([0.1014, 0.0954, 0.0969, 0.0452, 0.0981])
    lo, hi = y - 0.014, y + 0.014
    steps = label_steps(x, y, lo, hi)
    height = 0.04 * float(hi.max() - lo.min())
    shifted = [(np.log10(x[i]), y[i] - steps[i] * height) for i in range(len(x))]
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            near_x = abs(shifted[i][0] - shifted[j][0]) < 0.7
            assert not (near_x and abs(shifted[i][1] - shifted[j][1]) < height), (i, j, steps)
    assert steps[0] == 0 and steps[3] == 0  # the highest label and a far-away one stay in place
    assert label_steps(np.array([]), np.array([]), np.array([]), np.array([])) == []
