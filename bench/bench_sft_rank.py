"""Bench: the wall time for SFT to rank every ML-100K test user, from its cached trained model.

    python bench/bench_sft_rank.py --threads 2 --unit runs/ml100k-sft/sft/seed-0 > bench/sft-rank.json

Loads a learning-curve point (default `sft_n2048`, the leaderboard's `sft` model) from the run
store's checkpoint (nothing is trained), ranks all 943 test users through the method's own
`rank` (5 free beams, per-beam L2, round-robin, the popularity fill), and times it. With
`--unit`, the lists are compared with that published unit's rankings: the share of users whose
20 items are the same, in the same order (a speed change must not change a result). The CPU
model and the thread count are printed with the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precision import cpu_name  # noqa: E402
from bench_search_error import load_point  # noqa: E402

from benchmark.data.split import prepare_split  # noqa: E402
from benchmark.store import UnitFiles  # noqa: E402
from benchmark.types import CandidateSet, RankRequest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--point", default="sft_n2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--users", type=int, default=0, help="the first N test users (0: all)")
    ap.add_argument("--unit", default="", help="a finished unit directory whose rankings the lists must equal")
    ap.add_argument("--runs-dir", default="runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = prepare_split("ml-100k")
    test = split.test
    n = len(test) if args.users <= 0 else min(args.users, len(test))
    model = load_point(args.point, split, Path(args.runs_dir))
    model.params.num_threads = args.threads
    request = RankRequest(test.users[:n], [test.histories[r] for r in range(n)], CandidateSet("full", test.users[:n]),
                          k=20)
    t0 = time.perf_counter()
    ranked = model.rank(request)
    seconds = time.perf_counter() - t0
    out = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "point": args.point,
           "users": n, "seconds": seconds, "seconds_per_user": seconds / n,
           "grounding": model.params.grounding, "num_beams": model.params.num_beams}
    if args.unit:
        published = UnitFiles(Path(args.unit)).rankings()
        same = [list(map(int, ranked.items[r])) == published[int(u)] for r, u in enumerate(ranked.users)]
        out["unit"] = args.unit
        out["identical_lists"] = float(np.mean(same))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
