"""Randomization tests for a family: 8 methods x 100,000 users, all 28 pairs, 10,000 permutations.

    python bench/bench_stats.py [--users 100000] [--methods 8] [--permutations 10000] [--threads 1]
                                [--ranx-pairs 2] [--ranx-permutations 10000]

Times, in one process on the same per-user vectors:
  ours   benchmark.scoring.stats.randomization_tests (all pairs share one sign matrix per
         chunk: one GEMM [chunk, n] @ [n, 28]); also the whole compare_family (randomization
         + t-tests + bootstrap CIs of all 28 differences + Holm)
  ranx   ranx.statistical_tests.fisher_randomization_test (numba; the function ranx.compare
         calls per pair and metric), called directly on the same arrays. At full size it is
         slow, so it runs on --ranx-pairs pairs with --ranx-permutations and is scaled linearly
         to 28 pairs x 10,000 permutations (its cost is linear in both: one O(n) shuffle per
         permutation). ranx.compare itself calls it twice per unordered pair (both orders of
         every pair of runs), so compare() would take about twice the 28-pair figure.
Thread counts: BLAS (ours) and numba (ranx) are both limited to --threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import combinations
from pathlib import Path


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--methods", type=int, default=8)
    ap.add_argument("--permutations", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranx-pairs", type=int, default=2)
    ap.add_argument("--ranx-permutations", type=int, default=10_000)
    ap.add_argument("--skip-family", action="store_true", help="skip timing the whole compare_family")
    ap.add_argument("--skip-ranx", action="store_true")
    ap.add_argument(
        "--leaderboard-users", type=int, default=0,
        help="also time build_leaderboard + write_leaderboard for 8 labels x 3 seeds x 3 metrics on this many users",
    )
    return ap.parse_args()


def make_values(n_methods: int, n_users: int, seed: int = 0):
    """ndcg@10-like per-user values; methods share user difficulty, qualities close for some pairs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    difficulty = rng.beta(2, 5, n_users)
    quality = np.linspace(0.6, 1.4, n_methods)
    quality[1] = quality[0] * 1.003  # a pair that should not be significant
    X = np.empty((n_methods, n_users))
    for m in range(n_methods):
        hit = rng.random(n_users) < np.clip(difficulty * quality[m], 0, 1)
        rank = rng.integers(1, 11, n_users)
        X[m] = np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0)
    return X


def time_leaderboard(n_users: int, n_labels: int, n_permutations: int) -> None:
    import tempfile

    import numpy as np
    import pandas as pd

    from benchmark.leaderboard import UnitResult, build_leaderboard
    from benchmark.render import write_leaderboard

    users = [f"u{i}" for i in range(n_users)]
    units = []
    for seed in range(3):
        X = make_values(n_labels, n_users, seed=seed)
        for m in range(n_labels):
            frame = pd.DataFrame({"user": users, "ndcg@10": X[m], "hr@10": (X[m] > 0).astype(float)})
            frame["mrr@10"] = X[m] ** 2  # synthetic: any per-user values do for timing
            units.append(
                UnitResult(f"run-m{m}-s{seed}", f"m{m}", "synthetic", seed, {}, frame,
                           {"means": {}, "train_time_s": 1.0, "eval_time_s": 1.0, "validity": None, "info": {}})
            )
    t0 = time.perf_counter()
    lb = build_leaderboard(units, dataset="synthetic", protocol="loo", header={"date": "fixed"},
                           n_permutations=n_permutations)
    t_build = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_leaderboard(lb, Path(tmp))
        t_write = time.perf_counter() - t0
    print(
        f"ours: build_leaderboard ({n_labels} labels x 3 seeds x 3 metrics, {n_users:,} users, "
        f"{n_permutations:,} permutations, 10,000 bootstrap resamples): {t_build:.2f} s; write md+json+png: {t_write:.2f} s"
    )


def main() -> None:
    args = parse()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ranx.statistical_tests import fisher_randomization_test

    from benchmark.scoring.stats import compare_family, randomization_tests

    X = make_values(args.methods, args.users)
    pairs = list(combinations(range(args.methods), 2))
    P = args.permutations
    print(f"input: {args.methods} methods x {args.users:,} users, {len(pairs)} pairs, {P:,} permutations; threads {args.threads}")

    t0 = time.perf_counter()
    p_ours = randomization_tests(X, pairs, P, seed=0)
    t_ours = time.perf_counter() - t0
    print(f"ours: randomization_tests, all {len(pairs)} pairs: {t_ours:.2f} s")

    if not args.skip_family:
        values = {f"m{i}": X[i] for i in range(args.methods)}
        t0 = time.perf_counter()
        fam = compare_family(values, "ndcg@10", n_permutations=P, seed=0)
        t_fam = time.perf_counter() - t0
        print(
            f"ours: compare_family (randomization + t + bootstrap CIs of {len(pairs)} diffs, 10,000 resamples "
            f"+ Holm): {t_fam:.2f} s; significant pairs: {sum(r.significant for r in fam)}/{len(fam)}"
        )

    if args.leaderboard_users:
        time_leaderboard(args.leaderboard_users, args.methods, P)
    if args.skip_ranx:
        return
    # ranx, on a subset of pairs, scaled
    a0, b0 = X[0][:100].copy(), X[1][:100].copy()
    fisher_randomization_test(a0, b0, 10, 0.01, 42)  # JIT / cache load outside the timing
    chosen = pairs[: args.ranx_pairs]
    t0 = time.perf_counter()
    p_ranx = []
    for i, j in chosen:
        p, _ = fisher_randomization_test(X[i], X[j], args.ranx_permutations, 0.01, 42)
        p_ranx.append(float(p))
    t_ranx = time.perf_counter() - t0
    scale = (len(pairs) / len(chosen)) * (P / args.ranx_permutations)
    t_ranx_full = t_ranx * scale
    print(
        f"ranx: fisher_randomization_test on {len(chosen)} pair(s) x {args.ranx_permutations:,} permutations: "
        f"{t_ranx:.2f} s -> x{scale:g} = ~{t_ranx_full:.0f} s for {len(pairs)} pairs x {P:,} (extrapolated); "
        f"ranx.compare calls it for both orders: ~{2 * t_ranx_full:.0f} s"
    )
    for (i, j), pr in zip(chosen, p_ranx):
        k = pairs.index((i, j))
        print(f"  pair m{i}-m{j}: p ours {p_ours[k]:.4f} (b+1)/(P+1); p ranx {pr:.4f} b/P")
    print(
        f"SUMMARY users={args.users} methods={args.methods} pairs={len(pairs)} perms={P} threads={args.threads} "
        f"ours={t_ours:.2f}s ranx_extrapolated={t_ranx_full:.0f}s speedup={t_ranx_full / t_ours:.0f}x"
    )


if __name__ == "__main__":
    main()
