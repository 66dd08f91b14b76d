"""Significance statistics: exact oracle, scipy/statsmodels agreement, alignment errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from benchmark.errors import ConfigError, StoreError
from benchmark.scoring.stats import (
    PairResult,
    align,
    benjamini_hochberg,
    bootstrap_ci,
    bootstrap_cis,
    compare_family,
    effect_size,
    exact_randomization_test,
    holm,
    paired_t_test,
    randomization_test,
    randomization_tests,
    win_tie_loss,
)


@pytest.mark.parametrize("case", range(6))
def test_monte_carlo_agrees_with_exact_enumeration(case):
    rng = np.random.default_rng(100 + case)
    n = int(rng.integers(5, 13))
    a = rng.random(n)
    # a mixture of clear, borderline and null effects, with some exact ties (discrete metrics)
    shift = [0.0, 0.1, 0.25, 0.4, 0.0, 0.15][case]
    b = a - shift + rng.normal(0, 0.3, n)
    if case == 4:
        b = np.where(rng.random(n) < 0.5, a, np.round(rng.random(n), 1))
    p_exact = exact_randomization_test(a, b)
    p_mc = randomization_test(a, b, n_permutations=20_000, seed=case)
    assert 0.0 < p_exact <= 1.0
    assert abs(p_mc - p_exact) < 0.02, (p_mc, p_exact)


def test_exact_test_known_values():
    # d = (1, 1, 1): only the all-plus and all-minus sign vectors reach |sum| = 3 -> p = 2/8
    assert exact_randomization_test([1, 1, 1], [0, 0, 0]) == pytest.approx(0.25)
    # all differences zero -> every sign vector ties -> p = 1
    assert exact_randomization_test([0.5, 0.2], [0.5, 0.2]) == 1.0
    with pytest.raises(ValueError):
        exact_randomization_test(np.zeros(21), np.ones(21))


def test_randomization_p_value_form_and_seed():
    rng = np.random.default_rng(1)
    a, b = rng.random(50), rng.random(50)
    p1 = randomization_test(a, b, n_permutations=999, seed=3)
    p2 = randomization_test(a, b, n_permutations=999, seed=3)
    assert p1 == p2
    # (count + 1) / (P + 1) with P = 999 -> a multiple of 1/1000
    assert abs(p1 * 1000 - round(p1 * 1000)) < 1e-9
    # identical vectors: every permutation ties -> p = 1
    assert randomization_test(a, a, n_permutations=99) == 1.0
    # a huge effect: nothing beats the observed statistic -> smallest possible p
    assert randomization_test(a + 10, a, n_permutations=99) == pytest.approx(1 / 100)
    # the test is symmetric in its arguments
    assert randomization_test(b, a, n_permutations=999, seed=3) == p1


def test_many_pairs_share_signs_and_match_single_tests():
    rng = np.random.default_rng(2)
    X = rng.random((4, 300)) + np.array([0.0, 0.02, 0.05, 0.1])[:, None]
    pairs = [(0, 1), (0, 2), (1, 3), (2, 3), (3, 0)]
    many = randomization_tests(X, pairs, n_permutations=2_000, seed=7)
    single = [randomization_test(X[i], X[j], n_permutations=2_000, seed=7) for i, j in pairs]
    np.testing.assert_allclose(many, single, rtol=0, atol=1e-15)
    assert many.shape == (5,)
    assert many[-1] < 0.01  # a clear 0.1 shift over 300 users


def test_paired_t_test_matches_scipy_and_handles_zero_differences():
    rng = np.random.default_rng(3)
    a, b = rng.random(40), rng.random(40)
    assert paired_t_test(a, b) == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert paired_t_test(a, a) == 1.0
    assert paired_t_test(a + 1.0, a) == 0.0  # constant non-zero difference


def test_bootstrap_ci_close_to_scipy():
    rng = np.random.default_rng(4)
    x = rng.exponential(1.0, 400)
    lo, hi = bootstrap_ci(x, n_resamples=5_000, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=5_000, method="percentile", random_state=0).confidence_interval
    width = ref.high - ref.low
    assert lo < x.mean() < hi
    assert abs(lo - ref.low) < 0.1 * width
    assert abs(hi - ref.high) < 0.1 * width
    assert bootstrap_ci(x, n_resamples=5_000, seed=0) == (lo, hi)  # seeded


def test_bootstrap_ci_coverage_on_known_distribution():
    rng = np.random.default_rng(5)
    true_mean = 0.5
    trials, n = 200, 60
    X = rng.beta(2, 2, size=(n, trials))  # columns = independent samples, mean 0.5
    cis = bootstrap_cis(X, n_resamples=2_000, seed=1)
    covered = np.mean((cis[:, 0] <= true_mean) & (true_mean <= cis[:, 1]))
    assert 0.88 <= covered <= 0.99, covered


def test_bootstrap_difference_equals_columnwise():
    rng = np.random.default_rng(6)
    a, b = rng.random(100), rng.random(100)
    ci_cols = bootstrap_cis(np.stack([a - b, a], axis=1), n_resamples=1_000, seed=2)
    assert tuple(ci_cols[0]) == pytest.approx(bootstrap_ci(a - b, n_resamples=1_000, seed=2))


def test_effect_size_and_win_tie_loss():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([0.0, 2.0, 4.0, 2.0])
    d = a - b
    assert effect_size(a, b) == pytest.approx(d.mean() / d.std(ddof=1))
    assert effect_size(a, a) == 0.0
    assert effect_size(a + 1, a) == 0.0  # sd 0
    assert win_tie_loss(a, b) == (2, 1, 1)


def test_holm_and_bh_match_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(7)
    for m in (1, 2, 5, 28, 100):
        p = rng.random(m) ** 3
        p[: m // 4] = p[0]  # ties
        np.testing.assert_allclose(holm(p), multitest.multipletests(p, method="holm")[1], atol=1e-12)
        np.testing.assert_allclose(benjamini_hochberg(p), multitest.multipletests(p, method="fdr_bh")[1], atol=1e-12)
    with pytest.raises(ValueError):
        holm([0.1, np.nan])


def test_align_orders_users_and_rejects_mismatch():
    s1 = pd.Series([0.1, 0.2, 0.3], index=["u3", "u1", "u2"])
    s2 = pd.Series([1.0, 2.0, 3.0], index=["u1", "u2", "u3"])
    users, matrix = align({"m1": s1, "m2": s2})
    assert list(users) == ["u1", "u2", "u3"]
    np.testing.assert_allclose(matrix, [[0.2, 0.3, 0.1], [1.0, 2.0, 3.0]])
    s3 = pd.Series([1.0, 2.0], index=["u1", "u9"])
    with pytest.raises(StoreError, match=r"'m1' and 'm3'.*2 user\(s\) only in 'm1', 1 only in 'm3'"):
        align({"m1": s1, "m2": s2, "m3": s3})
    with pytest.raises(StoreError, match="more than one value"):
        align({"m1": s1, "m2": pd.Series([1.0, 2.0, 3.0], index=["u1", "u1", "u2"])})
    with pytest.raises(StoreError, match="non-finite"):
        align({"m1": s1, "m2": pd.Series([1.0, np.nan, 3.0], index=["u1", "u2", "u3"])})


def test_compare_family_all_pairs_and_baseline():
    rng = np.random.default_rng(8)
    base = rng.random(400)
    values = {"good": base + 0.2, "same": base + rng.normal(0, 1e-3, 400), "base": base}
    res = compare_family(values, "ndcg@10", pairs="all", n_permutations=2_000, seed=0)
    assert [(r.a, r.b) for r in res] == [("good", "same"), ("good", "base"), ("same", "base")]
    assert all(isinstance(r, PairResult) for r in res)
    raw = np.array([r.p_randomization for r in res])
    np.testing.assert_allclose([r.p_adjusted for r in res], holm(raw))
    good_base = res[1]
    assert good_base.diff == pytest.approx(0.2)
    assert good_base.ci_diff[0] <= 0.2 <= good_base.ci_diff[1] + 1e-12
    assert good_base.significant and good_base.wins == 400
    assert good_base.p_t < 1e-10
    assert not res[2].significant
    X = np.stack(list(values.values()))
    np.testing.assert_allclose(raw, randomization_tests(X, [(0, 1), (0, 2), (1, 2)], 2_000, 0))

    bl = compare_family(values, "hr@10", pairs="baseline:base", test="t", correction="bh", n_permutations=500)
    assert [(r.a, r.b) for r in bl] == [("good", "base"), ("same", "base")]
    np.testing.assert_allclose([r.p_adjusted for r in bl], benjamini_hochberg([r.p_t for r in bl]))
    with pytest.raises(ConfigError):
        compare_family(values, "hr@10", pairs="baseline:nope")
    with pytest.raises(ConfigError):
        compare_family(values, "hr@10", test="wilcoxon")
    with pytest.raises(ConfigError):
        compare_family(values, "hr@10", correction="bonferroni")


def test_compare_families_shares_draws_and_matches_single_metric_calls():
    from benchmark.scoring.stats import compare_families

    rng = np.random.default_rng(9)
    base = rng.random(150)
    by_metric = {
        "ndcg@10": {"x": base + 0.05, "y": base + rng.normal(0, 0.1, 150), "z": base},
        "hr@10": {"x": (base > 0.3).astype(float), "y": (base > 0.5).astype(float), "z": (base > 0.4).astype(float)},
    }
    together = compare_families(by_metric, n_permutations=999, seed=4, n_resamples=500)
    for metric, values in by_metric.items():
        alone = compare_family(values, metric, n_permutations=999, seed=4, n_resamples=500)
        assert [r.p_randomization for r in together[metric]] == [r.p_randomization for r in alone]
        assert [r.p_adjusted for r in together[metric]] == [r.p_adjusted for r in alone]
        assert [r.metric for r in together[metric]] == [metric] * 3
    with pytest.raises(ValueError, match="differ in length"):
        compare_families({"a": {"x": base, "y": base}, "b": {"x": base[:10], "y": base[:10]}})
