"""Time the data layer: load + preprocess (5-core) + split, cold and from the split cache.

    python bench/bench_data.py                 # ml-100k and ml-1m, loo and temporal
    python bench/bench_data.py --datasets ml-1m --protocols loo
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.data import load_raw, prepare_split  # noqa: E402
from benchmark.data.preprocess import preprocess  # noqa: E402
from benchmark.data.split import split_prepared  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"])
    parser.add_argument("--protocols", nargs="+", default=["loo", "temporal"])
    parser.add_argument("--kcore", type=int, default=5)
    args = parser.parse_args()
    print("| dataset | protocol | load s | preprocess s | split s | cold total s | cached s | users | items | interactions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets:
        for protocol in args.protocols:
            with tempfile.TemporaryDirectory() as cache:
                t0 = time.perf_counter()
                raw = load_raw(dataset)
                t1 = time.perf_counter()
                prep = preprocess(raw, kcore=args.kcore, dataset=dataset)
                t2 = time.perf_counter()
                split_prepared(prep, protocol, kcore=args.kcore, spec=dataset)
                t3 = time.perf_counter()
                prepare_split(dataset, protocol, args.kcore, cache_dir=Path(cache))  # cold, writes cache
                t4 = time.perf_counter()
                split = prepare_split(dataset, protocol, args.kcore, cache_dir=Path(cache))
                t5 = time.perf_counter()
            counts = split.config["preprocess"]
            print(
                f"| {dataset} | {protocol} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t3 - t2:.2f} | {t4 - t3:.2f} "
                f"| {t5 - t4:.2f} | {counts['users']} | {counts['items']} | {counts['interactions']} |"
            )


if __name__ == "__main__":
    main()
