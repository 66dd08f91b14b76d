"""Minimum detectable effect: checked against statsmodels' paired (one-sample) t-test power."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from benchmark.compare import compare_units
from benchmark.errors import ConfigError
from benchmark.leaderboard import UnitResult, build_leaderboard
from benchmark.render import render_markdown
from benchmark.scoring.power import min_detectable_effect, standardized_mde, t_test_power
from benchmark.scoring.stats import compare_family


@pytest.mark.parametrize("n", [5, 10, 30, 100, 943, 6040])  # below 5 users statsmodels' own solver can fail
@pytest.mark.parametrize("alpha, power", [(0.05, 0.8), (0.01, 0.9)])
def test_standardized_mde_matches_statsmodels(n, alpha, power):
    ours = standardized_mde(n, alpha, power)
    theirs = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    assert ours == pytest.approx(theirs, rel=1e-4)  # statsmodels' own solver stops at about 1e-5
    # our root is the exact one: statsmodels' power function gives exactly the asked power there
    assert TTestPower().power(effect_size=ours, nobs=n, alpha=alpha, alternative="two-sided") == pytest.approx(
        power, abs=1e-9
    )
    assert t_test_power(ours, n, alpha) == pytest.approx(power, abs=1e-9)


def test_mde_approaches_the_normal_approximation_from_above():
    for n, gap in [(30, 0.05), (100, 0.015), (6040, 3e-4)]:
        normal = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) / math.sqrt(n)
        exact = standardized_mde(n)
        assert normal < exact < normal * (1 + gap), (n, exact, normal)
    assert min_detectable_effect(0.2, 100) == pytest.approx(0.2 * standardized_mde(100))
    assert math.isnan(min_detectable_effect(0.2, 1))
    assert standardized_mde(2) > 10  # two users: only a huge effect is detectable


def test_each_pair_carries_its_mde_and_underpowered_flag():
    rng = np.random.default_rng(0)
    n = 150
    base = rng.random(n)
    values = {"a": base + 0.3, "b": base + rng.normal(0, 0.2, n), "c": base + 0.005 + rng.normal(0, 0.2, n)}
    pairs = compare_family(values, "ndcg@10", n_permutations=999, n_resamples=200)
    delta = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    for pr in pairs:
        sd = float(np.std(values[pr.a] - values[pr.b], ddof=1))
        assert pr.mde == pytest.approx(delta * sd, rel=1e-4)
        assert pr.underpowered == (abs(pr.diff) < pr.mde)
        assert pr.to_dict()["mde"] == pr.mde
    by_pair = {(pr.a, pr.b): pr for pr in pairs}
    assert not by_pair[("a", "b")].underpowered and by_pair[("b", "c")].underpowered


def _unit(label, values):
    frame = pd.DataFrame({"user": [f"u{i}" for i in range(len(values))], "ndcg@10": values})
    return UnitResult(label, label, label, 0, {}, frame, {"means": {"ndcg@10": float(np.mean(values))}, "info": {}})


def test_markdown_pair_table_shows_mde_and_marks_underpowered_pairs():
    rng = np.random.default_rng(1)
    base = rng.random(100)
    units = [_unit("strong", np.clip(base + 0.4, 0, 1)), _unit("x", base), _unit("y", np.clip(base + rng.normal(0, 0.1, 100), 0, 1))]
    lb = build_leaderboard(units, dataset="toy", protocol="p", header={}, metrics=("ndcg@10",), n_permutations=999)
    md = render_markdown(lb)
    assert "MDE (80% power)" in md and "exact noncentral t" in md
    pair_lines = [line for line in md.splitlines() if line.startswith("| a: strong") or line.startswith("| b: ")]
    assert len(pair_lines) == 3
    xy = next(line for line in pair_lines if "strong" not in line)
    assert "†" in xy  # x vs y differ by noise only
    assert all("†" not in line for line in pair_lines if "strong" in line)


def test_zero_or_negative_permutations_are_refused():
    units = [_unit("a", np.linspace(0, 1, 20)), _unit("b", np.linspace(0, 0.5, 20))]
    for bad in (0, -5):
        with pytest.raises(ConfigError, match="--permutations must be a positive"):
            build_leaderboard(units, dataset="t", protocol="p", header={}, metrics=("ndcg@10",), n_permutations=bad)
        with pytest.raises(ConfigError, match="--permutations"):
            compare_units(units[0], units[1], ("ndcg@10",), n_permutations=bad)
        with pytest.raises(ConfigError, match="--permutations"):
            compare_family({"a": np.ones(3), "b": np.zeros(3)}, "ndcg@10", n_permutations=bad)
    assert "MDE (80% power)" in compare_units(units[0], units[1], ("ndcg@10",), n_permutations=99, n_resamples=50)
