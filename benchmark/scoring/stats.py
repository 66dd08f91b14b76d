"""Paired significance statistics on per-user metric vectors over one user set.

- randomization (sign-flip) test, two-sided, statistic |mean(d)|, p = (b + 1) / (P + 1);
  sign vectors come from random bits and are shared by every pair of a family, so one
  matrix product [P, n] @ [n, pairs] per chunk tests all pairs at once;
- the exact version by enumeration of all 2^n sign vectors (small n; the test oracle);
- paired t-test, percentile bootstrap CIs (resample counts shared across columns),
  effect size (mean / sd of the differences), wins/ties/losses;
- Holm and Benjamini-Hochberg adjustments;
- per pair, the minimum detectable effect at 80% power (`benchmark.scoring.power`) and
  whether the observed difference is below it (underpowered);
- `align` (identical user sets or a StoreError) and `compare_family` for a whole family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from benchmark.errors import ConfigError, StoreError
from benchmark.scoring.power import POWER, standardized_mde

# Bytes of sign matrix handled per chunk; the chunk size depends only on n (never on the
# machine), so the same seed gives the same p-values everywhere.
_CHUNK_BYTES = 64 * 2**20
_TIE_TOL = 1e-9  # relative tolerance: a permuted statistic equal to the observed one counts


def _as_vector(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D per-user vector, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values; every user needs a finite metric value")
    return arr


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_vector(a, "a"), _as_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length ({a.shape[0]} vs {b.shape[0]}); align users first")
    if a.shape[0] == 0:
        raise ValueError("paired vectors are empty; there are no users to compare")
    return a, b


def _chunk_rows(n: int) -> int:
    return int(max(16, min(4096, _CHUNK_BYTES // (8 * max(n, 1)))))


def _sign_flip_counts(D: np.ndarray, n_permutations: int, seed: int, progress: bool = False) -> np.ndarray:
    """For each column d of D [n, p]: how many random sign vectors s give |s.d| >= |sum d|."""
    n, n_cols = D.shape
    observed = np.abs(D.sum(axis=0))
    threshold = observed - _TIE_TOL * np.maximum(np.abs(D).sum(axis=0), 1e-300)
    total = D.sum(axis=0)
    counts = np.zeros(n_cols, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_bytes = (n + 7) // 8
    chunk = _chunk_rows(n)
    starts = range(0, n_permutations, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="permutations", unit="chunk")
    for start in starts:
        rows = min(chunk, n_permutations - start)
        bits = np.unpackbits(rng.integers(0, 256, size=(rows, n_bytes), dtype=np.uint8), axis=1, count=n)
        # s = 2*bit - 1, so s.d = 2 * bit.d - sum(d): one GEMM on 0/1 float64
        stat = 2.0 * (bits.astype(np.float64) @ D) - total
        counts += (np.abs(stat) >= threshold).sum(axis=0)
    return counts


def check_permutations(n_permutations: int) -> None:
    """ConfigError unless there is at least one sign flip: with none, every p-value would be 1.0."""
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, (int, np.integer)) or n_permutations < 1:
        raise ConfigError(
            f"--permutations must be a positive number of sign flips, got {n_permutations!r}: with none every "
            "randomization p-value would be 1.0 and nothing significant; use e.g. --permutations 10000"
        )


def randomization_tests(
    X: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    n_permutations: int = 10_000,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Two-sided paired sign-flip p-values for rows X[i] vs X[j] of X [methods, users], per pair.

    All pairs share the same seeded sign vectors; p = (b + 1) / (n_permutations + 1).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [methods, users], got shape {X.shape}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X holds NaN or infinite values; every user needs a finite metric value")
    pairs = [(int(i), int(j)) for i, j in pairs]
    if not pairs:
        return np.zeros(0)
    D = np.stack([X[i] - X[j] for i, j in pairs], axis=1)
    counts = _sign_flip_counts(D, n_permutations, seed, progress)
    return (counts + 1.0) / (n_permutations + 1.0)


def randomization_test(a, b, n_permutations: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired sign-flip test of mean(a - b) = 0; Monte Carlo, seeded."""
    a, b = _paired(a, b)
    return float(randomization_tests(np.stack([a, b]), [(0, 1)], n_permutations, seed)[0])


def exact_randomization_test(a, b) -> float:
    """The sign-flip p-value by enumerating all 2^n sign vectors (n <= 20)."""
    a, b = _paired(a, b)
    d = a - b
    n = d.shape[0]
    if n > 20:
        raise ValueError(f"exact enumeration needs n <= 20 users, got {n}; use randomization_test")
    observed = abs(d.sum())
    threshold = observed - _TIE_TOL * max(np.abs(d).sum(), 1e-300)
    count = 0
    step = 1 << 16
    for start in range(0, 2**n, step):
        codes = np.arange(start, min(start + step, 2**n), dtype=np.int64)[:, None]
        bits = ((codes >> np.arange(n)) & 1).astype(np.float64)
        stat = 2.0 * (bits @ d) - d.sum()
        count += int((np.abs(stat) >= threshold).sum())
    return count / float(2**n)


def paired_t_test(a, b) -> float:
    """Two-sided paired t-test p-value; 1.0 when every difference is zero."""
    a, b = _paired(a, b)
    d = a - b
    if not np.any(d):
        return 1.0
    if a.shape[0] < 2:
        return 1.0
    if np.ptp(d) <= 1e-12 * np.abs(d).max():  # constant non-zero difference: sd is 0
        return 0.0
    p = float(sps.ttest_rel(a, b).pvalue)
    if np.isnan(p):  # constant non-zero difference: infinitely significant
        return 0.0
    return p


def bootstrap_cis(
    X: np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> np.ndarray:
    """Percentile bootstrap CIs of the mean of each column of X [n, m] -> [m, 2].

    Every column uses the same resampled user sets (counts matrix [R, n] @ X), so the
    CI of a difference equals the CI of the column a - b under the same resamples.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    n, m = X.shape
    if n == 0:
        raise ValueError("cannot bootstrap an empty vector; there are no users")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    chunk = _chunk_rows(n)
    means = np.empty((n_resamples, m))
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        idx += (np.arange(rows) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)
        means[start : start + rows] = (counts.astype(np.float64) @ X) / n
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [100.0 * tail, 100.0 * (1.0 - tail)], axis=0)
    return np.stack([lo, hi], axis=1)


def bootstrap_ci(x, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(x); for a paired difference pass a - b."""
    x = _as_vector(x, "x")
    lo, hi = bootstrap_cis(x[:, None], n_resamples, confidence, seed)[0]
    return float(lo), float(hi)


def effect_size(a, b) -> float:
    """Paired standardized mean difference mean(d) / sd(d, ddof=1); 0 when sd is 0."""
    a, b = _paired(a, b)
    d = a - b
    if d.shape[0] < 2:
        return 0.0
    sd = float(d.std(ddof=1))
    if sd == 0.0 or not np.isfinite(sd):
        return 0.0
    return float(d.mean() / sd)


def win_tie_loss(a, b, tol: float = 1e-12) -> tuple[int, int, int]:
    """Users where a > b, a == b (within tol), a < b."""
    a, b = _paired(a, b)
    d = a - b
    ties = np.abs(d) <= tol
    return int(np.sum((d > 0) & ~ties)), int(ties.sum()), int(np.sum((d < 0) & ~ties))


def _check_p(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p-values must be a 1-D array, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must be finite numbers in [0, 1]")
    return p


def holm(p) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), in the input order."""
    p = _check_p(p)
    m = p.shape[0]
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    p = _check_p(p)
    m = p.shape[0]
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out


CORRECTIONS = ("holm", "bh", "none")
TESTS = ("randomization", "t")


def adjust(p, correction: str) -> np.ndarray:
    """Apply "holm", "bh" or "none" to a family of p-values."""
    if correction == "holm":
        return holm(p)
    if correction == "bh":
        return benjamini_hochberg(p)
    if correction == "none":
        return _check_p(p).copy()
    raise ConfigError(f"unknown correction {correction!r}; use one of {', '.join(CORRECTIONS)}")


def align(per_user: dict[str, pd.Series]) -> tuple[np.ndarray, np.ndarray]:
    """Per-method Series indexed by user -> (sorted users, matrix [methods, users]).

    Every method must cover exactly the same users (never a silent drop): otherwise
    a StoreError names the methods and how many users differ.
    """
    if not per_user:
        raise StoreError("no per-user results to align; evaluate at least one method first")
    names = list(per_user)
    reference = names[0]
    ref_index = pd.Index(per_user[reference].index)
    for name in names:
        index = pd.Index(per_user[name].index)
        if index.has_duplicates:
            dup = index[index.duplicated()].unique()
            raise StoreError(
                f"method {name!r} has {len(dup)} user(s) with more than one value (e.g. {dup[0]!r}); "
                "each user needs exactly one value per metric — re-run or repair that result"
            )
        if name == reference:
            continue
        only_ref = ref_index.difference(index)
        only_this = index.difference(ref_index)
        if len(only_ref) or len(only_this):
            example = (list(only_ref[:1]) + list(only_this[:1]))[0]
            raise StoreError(
                f"methods {reference!r} and {name!r} were evaluated on different users: "
                f"{len(only_ref)} user(s) only in {reference!r}, {len(only_this)} only in {name!r} "
                f"(e.g. {example!r}); re-run them on the same split and candidate set"
            )
    users = np.asarray(sorted(ref_index), dtype=object)
    matrix = np.stack([per_user[name].reindex(users).to_numpy(dtype=np.float64) for name in names])
    bad = ~np.isfinite(matrix)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise StoreError(
            f"method {names[row]!r} has {int(bad[row].sum())} missing or non-finite per-user value(s); "
            "every user needs a value — re-run or repair that result"
        )
    return users, matrix


@dataclass
class PairResult:
    """One paired comparison a vs b on one metric (diff = mean_a - mean_b)."""

    a: str
    b: str
    metric: str
    mean_a: float
    mean_b: float
    diff: float
    ci_diff: tuple[float, float]
    p_randomization: float
    p_t: float
    p_adjusted: float
    effect_size: float
    wins: int
    ties: int
    losses: int
    significant: bool = False  # p_adjusted < alpha
    mde: float = float("nan")  # minimum detectable |diff| at 80% power and alpha (paired t, uncorrected)
    underpowered: bool = False  # |diff| < mde: "not significant" here does not mean "no difference"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci_diff"] = [float(v) for v in self.ci_diff]
        return out


def family_pairs(labels: Sequence[str], pairs: str = "all") -> list[tuple[int, int]]:
    """"all": every (i, j) with i < j; "baseline:<label>": every other label vs that one."""
    labels = list(labels)
    if pairs == "all":
        return list(combinations(range(len(labels)), 2))
    if pairs.startswith("baseline:"):
        base = pairs.split(":", 1)[1]
        if base not in labels:
            raise ConfigError(f"baseline {base!r} is not among the compared methods ({', '.join(labels)})")
        j = labels.index(base)
        return [(i, j) for i in range(len(labels)) if i != j]
    raise ConfigError(f"unknown pairs {pairs!r}; use 'all' or 'baseline:<label>'")


def compare_families(
    values: dict[str, dict[str, np.ndarray]],
    pairs: str = "all",
    test: str = "randomization",
    correction: str = "holm",
    n_permutations: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    progress: bool = False,
) -> dict[str, list[PairResult]]:
    """compare_family for several metrics at once: metric -> {label -> per-user vector}.

    The sign vectors and bootstrap resamples are drawn once and shared by every pair of
    every metric (the same seed gives the same p-values as one metric at a time); the
    correction is still applied per metric, across that metric's family of pairs.
    """
    if test not in TESTS:
        raise ConfigError(f"unknown test {test!r}; use one of {', '.join(TESTS)}")
    if correction not in CORRECTIONS:
        raise ConfigError(f"unknown correction {correction!r}; use one of {', '.join(CORRECTIONS)}")
    check_permutations(n_permutations)
    blocks = []  # (metric, labels, X, index_pairs)
    n_users = None
    for metric, by_label in values.items():
        labels = list(by_label)
        if not labels:
            blocks.append((metric, labels, np.zeros((0, 0)), []))
            continue
        vectors = [_as_vector(by_label[name], name) for name in labels]
        lengths = {len(v) for v in vectors} | ({n_users} if n_users is not None else set())
        if len(lengths) > 1:
            raise ValueError("per-user vectors differ in length; align users first")
        X = np.stack(vectors)
        n_users = X.shape[1]
        blocks.append((metric, labels, X, family_pairs(labels, pairs)))
    diffs = [X[i] - X[j] for _, _, X, index_pairs in blocks for i, j in index_pairs]
    out: dict[str, list[PairResult]] = {metric: [] for metric in values}
    if not diffs:
        return out
    D = np.stack(diffs, axis=1)
    # one standardized MDE for the whole family (it depends on n and alpha only), times each pair's sd
    delta = standardized_mde(D.shape[0], alpha, POWER) if D.shape[0] >= 2 else float("nan")
    p_rand_all = (_sign_flip_counts(D, n_permutations, seed, progress) + 1.0) / (n_permutations + 1.0)
    cis_all = bootstrap_cis(D, n_resamples, confidence, seed)
    offset = 0
    for metric, labels, X, index_pairs in blocks:
        m = len(index_pairs)
        p_rand = p_rand_all[offset : offset + m]
        cis = cis_all[offset : offset + m]
        offset += m
        if m == 0:
            continue
        p_t = np.array([paired_t_test(X[i], X[j]) for i, j in index_pairs])
        p_adj = adjust(p_rand if test == "randomization" else p_t, correction)
        for k, (i, j) in enumerate(index_pairs):
            w, t, l = win_tie_loss(X[i], X[j])
            diff = float(X[i].mean() - X[j].mean())
            mde = delta * float((X[i] - X[j]).std(ddof=1)) if X.shape[1] >= 2 else float("nan")
            out[metric].append(
                PairResult(
                    a=labels[i],
                    b=labels[j],
                    metric=metric,
                    mean_a=float(X[i].mean()),
                    mean_b=float(X[j].mean()),
                    diff=diff,
                    ci_diff=(float(cis[k, 0]), float(cis[k, 1])),
                    p_randomization=float(p_rand[k]),
                    p_t=float(p_t[k]),
                    p_adjusted=float(p_adj[k]),
                    effect_size=effect_size(X[i], X[j]),
                    wins=w,
                    ties=t,
                    losses=l,
                    significant=bool(p_adj[k] < alpha),
                    mde=mde,
                    underpowered=not abs(diff) >= mde,  # NaN (one user): underpowered
                )
            )
    return out


def compare_family(
    values: dict[str, np.ndarray],
    metric: str,
    pairs: str = "all",
    test: str = "randomization",
    correction: str = "holm",
    n_permutations: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    progress: bool = False,
) -> list[PairResult]:
    """Test a family of pairs on one metric; correction is applied across the family.

    values: label -> per-user vector, all over the same users in the same order.
    pairs "all" gives (labels[i], labels[j]) for i < j in the order of `values`;
    "baseline:<label>" gives (other, baseline). PairResult.diff = mean_a - mean_b.
    """
    return compare_families(
        {metric: values}, pairs, test, correction, n_permutations, seed, alpha, n_resamples, confidence, progress
    )[metric]
