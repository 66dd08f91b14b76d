"""Collect finished units from the run store and publish/compare them.

The newest finished unit per (method label, seed) on the newest split fingerprint of a
dataset/protocol enters the leaderboard; its run ids go in the footnote.
"""

from __future__ import annotations

from pathlib import Path

from benchmark.errors import StoreError
from benchmark.compare import compare_units
from benchmark.leaderboard import UnitResult, build_leaderboard
from benchmark.render import write_leaderboard
from benchmark.store import RunStore, UnitFiles


def load_unit(unit: UnitFiles) -> UnitResult:
    cfg = unit.config
    return UnitResult(
        run_id=cfg["run_id"],
        label=cfg["label"],
        method=cfg["method"],
        seed=int(cfg["seed"]),
        params=cfg["params"],
        per_user=unit.per_user(),
        metrics=unit.metrics,
    )


def collect_units(store: RunStore, dataset: str, protocol: str) -> tuple[list[UnitFiles], str]:
    """Newest unit per (label, seed) on the newest split fingerprint; also returns that fingerprint."""
    matching = []
    for unit in store.finished_units():
        cfg = unit.config
        if cfg.get("dataset") == dataset and cfg.get("protocol") == protocol:
            matching.append((cfg["run_id"], unit))
    if not matching:
        raise StoreError(
            f"no finished runs for dataset {dataset!r} and protocol {protocol!r} under {store.root}; "
            f"run `python -m benchmark run --methods pop,sasrec --dataset {dataset}` first "
            f"(see `python -m benchmark runs` for what exists)"
        )
    matching.sort(key=lambda x: x[0])
    fingerprint = matching[-1][1].config["split_fingerprint"]
    latest: dict[tuple[str, int], UnitFiles] = {}
    for _, unit in matching:
        cfg = unit.config
        if cfg["split_fingerprint"] == fingerprint:
            latest[(cfg["label"], int(cfg["seed"]))] = unit
    return [latest[key] for key in sorted(latest)], fingerprint


def header_for(store: RunStore, units: list[UnitFiles], dataset: str, protocol: str) -> dict:
    run_ids = sorted({u.config["run_id"] for u in units})
    metas = [store.run_meta(r) for r in run_ids]
    newest = metas[-1]
    manifest = newest.get("manifest", {})
    stats = newest.get("split_stats", {})
    seeds = sorted({int(u.config["seed"]) for u in units})
    return {
        "dataset": dataset,
        "dataset stats": ", ".join(f"{k} {v}" for k, v in stats.items()) or "—",
        "split": f"{newest.get('split')} (k-core {newest.get('split_config', {}).get('kcore', '?')}, "
        f"fingerprint {newest.get('split_fingerprint')})",
        "candidates": newest.get("candidates"),
        "protocol": protocol,
        "test users": newest.get("n_test_users"),
        "seeds": ",".join(str(s) for s in seeds),
        "date": max(m.get("created", "") for m in metas),
        "package version": manifest.get("versions", {}).get("benchmark"),
        "git commit": manifest.get("git_commit"),
        "device": manifest.get("device_name"),
        "runs": run_ids,
    }


def publish(
    store: RunStore,
    dataset: str,
    protocol: str,
    *,
    out_dir: Path,
    metrics: tuple[str, ...] = ("ndcg@10", "hr@10", "mrr@10"),
    baseline: str | None = None,
    correction: str = "holm",
    test: str = "randomization",
    n_permutations: int = 10_000,
    alpha: float = 0.05,
) -> list[Path]:
    units, _ = collect_units(store, dataset, protocol)
    results = [load_unit(u) for u in units]
    if baseline is not None and baseline not in {r.label for r in results}:
        raise StoreError(f"--baseline {baseline!r} has no finished run here; have: {sorted({r.label for r in results})}")
    header = header_for(store, units, dataset, protocol)
    lb = build_leaderboard(
        results,
        dataset=dataset,
        protocol=protocol,
        header=header,
        metrics=metrics,
        primary=metrics[0],
        baseline=baseline,
        test=test,
        correction=correction,
        n_permutations=n_permutations,
        alpha=alpha,
    )
    return write_leaderboard(lb, Path(out_dir))


def compare_refs(store: RunStore, a: str, b: str, *, metrics: tuple[str, ...], n_permutations: int = 10_000) -> str:
    ua, ub = store.resolve_unit(a), store.resolve_unit(b)
    if ua.config["split_fingerprint"] != ub.config["split_fingerprint"]:
        raise StoreError(f"{a} and {b} were evaluated on different splits; compare runs of the same dataset and protocol")
    return compare_units(load_unit(ua), load_unit(ub), metrics, n_permutations=n_permutations)
