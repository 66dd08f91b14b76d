"""Per-user metrics (hr/ndcg/mrr/recall @1/5/10/20) for 1M users x top-20: ours vs ranx.

    python bench/bench_scoring.py [--users 1000000] [--threads 1] [--dict-users 100000]

Times, in one process on the same random input:
  ours          benchmark.scoring.metrics.per_user_metrics (includes the duplicate check)
  ranx build    turning the ranked matrix into ranx's inputs: (a) numba typed lists of
                [doc, score] arrays (the fastest route ranx accepts), (b) Qrels/Run from
                Python dicts (the documented route; timed on --dict-users and scaled)
  ranx evaluate ranx.evaluate on the typed lists, return_mean=False, same 16 metrics
Results are checked to agree per user before any time is reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_input(n_users: int, k: int, n_items: int, seed: int):
    rng = np.random.default_rng(seed)
    start = rng.integers(0, n_items, n_users)
    step = rng.integers(1, n_items, n_users)  # n_items prime -> k distinct items per row
    ranked = (start[:, None] + step[:, None] * np.arange(k)) % n_items
    targets = rng.integers(0, n_items, n_users)
    inside = rng.random(n_users) < 0.5
    pos = rng.integers(0, k, n_users)
    targets[inside] = ranked[inside, pos[inside]]
    return ranked.astype(np.int64), targets.astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--items", type=int, default=10_007)
    ap.add_argument("--threads", type=int, default=1, help="numba threads for ranx (ours is single-threaded numpy)")
    ap.add_argument("--dict-users", type=int, default=100_000, help="users for the dict -> Qrels/Run timing")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import numba
    from numba.typed import List
    from ranx import Qrels, Run, evaluate

    from benchmark.scoring.metrics import METRIC_NAMES, per_user_metrics

    cutoffs = (1, 5, 10, 20)
    ranx_name = {"hr": "hit_rate", "ndcg": "ndcg", "mrr": "mrr", "recall": "recall"}
    wanted = [(f"{m}@{c}", f"{ranx_name[m]}@{c}") for c in cutoffs for m in METRIC_NAMES]
    ranked, targets = make_input(args.users, args.k, args.items, seed=0)
    n, k = ranked.shape
    print(f"input: {n:,} users x top-{k}, {args.items} items; numba threads for ranx: {args.threads}")

    t0 = time.perf_counter()
    ours = per_user_metrics(ranked, targets, cutoffs)
    t_ours = time.perf_counter() - t0
    print(f"ours: per_user_metrics, 16 metrics: {t_ours:.2f} s")

    # ranx's fastest input: typed lists of float64 [doc, score] arrays, queries in our order
    t0 = time.perf_counter()
    scores = np.arange(k, 0, -1, dtype=np.float64)
    run_arrays = np.stack([ranked.astype(np.float64), np.broadcast_to(scores, (n, k))], axis=2)
    qrel_arrays = np.stack([targets.astype(np.float64), np.ones(n)], axis=1)[:, None, :]
    run_list, qrels_list = List(), List()
    for u in range(n):
        run_list.append(run_arrays[u])
        qrels_list.append(qrel_arrays[u])
    t_build_typed = time.perf_counter() - t0
    print(f"ranx build: numba typed lists: {t_build_typed:.2f} s")

    numba.set_num_threads(args.threads)
    evaluate(qrels_list[:100], run_list[:100], [w[1] for w in wanted], return_mean=False, threads=args.threads)
    t0 = time.perf_counter()
    theirs = evaluate(qrels_list, run_list, [w[1] for w in wanted], return_mean=False, threads=args.threads)
    t_ranx = time.perf_counter() - t0
    print(f"ranx evaluate (16 metrics, typed lists): {t_ranx:.2f} s")
    worst = max(float(np.max(np.abs(ours[o] - np.asarray(theirs[r])))) for o, r in wanted)
    print(f"max |ours - ranx| over all users and metrics: {worst:.2e}")
    assert worst < 1e-9

    # the documented route: Python dicts -> Qrels / Run, on a subset, scaled linearly
    m = min(args.dict_users, n)
    t0 = time.perf_counter()
    qrels_dict = {f"u{u}": {f"i{targets[u]}": 1} for u in range(m)}
    run_dict = {f"u{u}": {f"i{it}": float(k - p) for p, it in enumerate(ranked[u])} for u in range(m)}
    t_dicts = time.perf_counter() - t0
    t0 = time.perf_counter()
    qrels, run = Qrels(qrels_dict), Run(run_dict)
    t_objs = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(qrels, run, [w[1] for w in wanted], return_mean=False, threads=args.threads)
    t_eval_objs = time.perf_counter() - t0
    scale = n / m
    print(
        f"ranx via dicts on {m:,} users: python dicts {t_dicts:.2f} s, Qrels/Run {t_objs:.2f} s, "
        f"evaluate(Qrels, Run) {t_eval_objs:.2f} s (incl. conversion to typed lists); "
        f"x{scale:g} -> ~{(t_dicts + t_objs + t_eval_objs) * scale:.0f} s for {n:,} users (extrapolated)"
    )
    print(
        f"SUMMARY users={n} ours={t_ours:.2f}s ranx_evaluate={t_ranx:.2f}s ranx_build_typed={t_build_typed:.2f}s "
        f"speedup_vs_evaluate={t_ranx / t_ours:.1f}x"
    )


if __name__ == "__main__":
    main()
