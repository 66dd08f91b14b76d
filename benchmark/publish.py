"""Publish a leaderboard from the run store merged with its published evidence; compare two units.

The newest finished unit per (method label, seed) on the newest split fingerprint of a
dataset/protocol in the run store is merged with the evidence published under
`<leaderboards>/<dataset>-<protocol>/` (benchmark.merge); every unit, local or published,
passes the integrity checks (benchmark.integrity); then the leaderboard is built and written
with its evidence (benchmark.evidence). Nothing is written unless every check passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from benchmark.compare import compare_units
from benchmark.errors import StoreError
from benchmark.evidence import Unit, evidence_index, local_unit, read_evidence, unit_candidate_fingerprint, write_evidence
from benchmark.integrity import check_published_users, check_same_users, check_unit
from benchmark.leaderboard import UnitResult, build_leaderboard
from benchmark.merge import check_fingerprints, check_split_fingerprint, merge_units
from benchmark.render import leaderboard_stem, write_leaderboard
from benchmark.scoring.stats import check_permutations
from benchmark.store import RunStore, UnitFiles


def to_result(unit: Unit, frame: pd.DataFrame) -> UnitResult:
    cfg = unit.config
    return UnitResult(
        run_id=unit.run_id,
        label=unit.label,
        method=cfg["method"],
        seed=unit.seed,
        params=cfg["params"],
        per_user=frame,
        metrics=unit.metrics,
    )


def collect_units(store: RunStore, dataset: str, protocol: str) -> tuple[list[UnitFiles], str | None]:
    """Newest unit per (label, seed) on the newest split fingerprint, and that fingerprint ([] and None if none)."""
    matching = []
    for unit in store.finished_units():
        cfg = unit.config
        if cfg.get("dataset") == dataset and cfg.get("protocol") == protocol:
            matching.append((cfg["run_id"], unit))
    for run_id in store.orphans():  # units whose run.json was deleted would be left out silently
        for metrics in sorted(store.run_dir(run_id).glob("*/seed-*/metrics.json")):
            cfg = UnitFiles(metrics.parent).config
            if cfg.get("dataset") == dataset and cfg.get("protocol") == protocol:
                raise StoreError(
                    f"{store.run_dir(run_id)} holds finished {dataset} {protocol} units but its run.json is missing; "
                    f"rerun the command that made it with --run-id {run_id} (finished units are reused), or delete "
                    "that directory"
                )
    if not matching:
        return [], None
    matching.sort(key=lambda x: x[0])
    fingerprint = matching[-1][1].config["split_fingerprint"]
    latest: dict[tuple[str, int], UnitFiles] = {}
    for _, unit in matching:
        cfg = unit.config
        if cfg["split_fingerprint"] == fingerprint:
            latest[(cfg["label"], int(cfg["seed"]))] = unit
    return [latest[key] for key in sorted(latest)], fingerprint


def header_for(units: list[Unit], dataset: str, protocol: str, candidate_fp: str, stem: str) -> dict:
    run_ids = sorted({u.run_id for u in units})
    metas = {u.run_id: u.run for u in units if u.run}  # runs published without a manifest have none
    first = units[0].config
    newest = metas[max(metas)] if metas else {  # what every unit's config.json and metrics.json state
        "split": first.get("split"), "split_fingerprint": first.get("split_fingerprint"),
        "candidates": first.get("candidates"), "n_test_users": units[0].metrics.get("n_users")}
    manifest = newest.get("manifest", {})
    stats = newest.get("split_stats", {})
    seeds = sorted({u.seed for u in units})
    return {
        "dataset": dataset,
        "dataset stats": ", ".join(f"{k} {v}" for k, v in stats.items()) or "—",
        "split": f"{newest.get('split')} (k-core {newest.get('split_config', {}).get('kcore', '?')}, "
        f"fingerprint {newest.get('split_fingerprint')})",
        "candidates": f"{newest.get('candidates')} (fingerprint {candidate_fp})",
        "protocol": protocol,
        "test users": newest.get("n_test_users"),
        "seeds": ",".join(str(s) for s in seeds),
        "date": max((m.get("created", "") for m in metas.values()), default="") or "—",
        "package version": manifest.get("versions", {}).get("benchmark"),
        "git commit": manifest.get("git_commit"),
        "device": manifest.get("device_name"),
        "runs": run_ids,
        "evidence": f"[{stem}/]({stem}/): per-user metrics, rankings, config, metrics and run manifest of every row; "
        f"audit with `python -m benchmark verify --dataset {dataset} --protocol {protocol}`",
    }


def _no_units(store: RunStore, dataset: str, protocol: str) -> StoreError:
    return StoreError(
        f"no finished runs for dataset {dataset!r} and protocol {protocol!r} under {store.root}, and no published "
        f"evidence; run `python -m benchmark run --methods pop,sasrec --dataset {dataset}` first "
        f"(see `python -m benchmark runs` for what exists)"
    )


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
    replace: tuple[str, ...] | list[str] = (),
    replace_all: bool = False,
    expected_users: set[str] | None = None,
    labels: tuple[str, ...] | list[str] | None = None,
    note: Callable[[str], None] = lambda line: None,
) -> list[Path]:
    """Merge, check, build and write `<dataset>-<protocol>.{md,json,png}`, `-cost.png` and the evidence folder.

    expected_users: the protocol's test users (or --eval-users subsample) when the caller knows
    them (`run --publish`); every row must hold exactly these. `labels`: only these local rows
    (e.g. without the points of a learning curve kept in the same run store); None takes all.
    `note` receives one line per thing the user should know (rows kept, replaced, a legacy
    leaderboard without evidence).
    """
    check_permutations(n_permutations)
    out_dir = Path(out_dir)
    stem = leaderboard_stem(dataset, protocol)
    folder = out_dir / stem
    evidence = read_evidence(folder)
    files, _ = collect_units(store, dataset, protocol)
    if labels is not None:
        unknown = sorted(set(labels) - {f.config.get("label") for f in files})
        if unknown:
            raise StoreError(f"--labels names {', '.join(unknown)}, which the run store holds no finished "
                             f"{dataset}/{protocol} unit of; see `python -m benchmark runs`")
        files = [f for f in files if f.config.get("label") in set(labels)]
    local = [local_unit(store, f) for f in files]
    published = evidence.units if evidence is not None else []
    if not local and not published:
        raise _no_units(store, dataset, protocol)
    per_user = {}  # every unit read, local or published, is checked before anything else is decided
    for unit in local + published:
        per_user[id(unit)] = unit.per_user()
        check_unit(unit, per_user[id(unit)])
    if local and evidence is not None:
        candidate_fp = check_fingerprints(local, evidence, store.cache_dir)
    elif local:
        candidate_fp = unit_candidate_fingerprint(local[0], store.cache_dir)
    else:
        candidate_fp = evidence.index["candidate_fingerprint"]
    merged = merge_units(local, evidence, replace, replace_all)
    frames = [(u, per_user[id(u)]) for u in merged.units]
    expected = None if expected_users is None else {str(u) for u in expected_users}
    users = check_same_users(frames, expected, "this protocol's test users")
    if any(u.published for u in merged.units):
        check_published_users(evidence, users)
    results = [to_result(u, frame) for u, frame in frames]
    if baseline is not None and baseline not in {r.label for r in results}:
        raise StoreError(f"--baseline {baseline!r} has no finished run here; have: {sorted({r.label for r in results})}")
    lb = build_leaderboard(
        results,
        dataset=dataset,
        protocol=protocol,
        header=header_for(merged.units, dataset, protocol, candidate_fp, stem),
        metrics=metrics,
        primary=metrics[0],
        baseline=baseline,
        test=test,
        correction=correction,
        n_permutations=n_permutations,
        alpha=alpha,
    )
    # every check has passed and the tests have run: only now is anything written
    if evidence is None and (out_dir / f"{stem}.md").is_file():
        note(f"note: {out_dir / stem}.md was published without evidence; its rows cannot be merged and are "
             f"replaced by this leaderboard, which now carries its evidence in {folder}/")
    if merged.kept:
        note(f"kept {len(merged.kept)} published row(s) not in the run store: {', '.join(merged.kept)}")
    if merged.replaced:
        note(f"replaced published row(s) by local ones: {', '.join(merged.replaced)}")
    index = evidence_index(merged.units, dataset=dataset, protocol=protocol, candidate_fp=candidate_fp, users=sorted(users))
    write_evidence(folder, merged.units, index, evidence)
    return write_leaderboard(lb, out_dir) + [folder]


def check_publishable(
    out_dir: Path,
    dataset: str,
    protocol: str,
    split_fingerprint: str,
    labels: list[str],
    *,
    replace=(),
    replace_all: bool = False,
    note: Callable[[str], None] = lambda line: None,
) -> None:
    """Before `run --publish` spends any time: refuse a split the published leaderboard was not made on,
    and say which labels are already published (publishing them will need --replace unless reproduced)."""
    evidence = read_evidence(Path(out_dir) / leaderboard_stem(dataset, protocol))
    if evidence is None:
        return
    check_split_fingerprint(split_fingerprint, evidence)
    published = {u.label for u in evidence.units}
    clash = [lab for lab in labels if lab in published and not replace_all and lab not in replace]
    if clash:
        note(f"note: {', '.join(clash)} already published in {evidence.folder}/; unless this run reproduces it "
             f"exactly, --publish will stop and ask for --replace {','.join(clash)}")


def compare_refs(store: RunStore, a: str, b: str, *, metrics: tuple[str, ...], n_permutations: int = 10_000) -> str:
    check_permutations(n_permutations)
    ua, ub = (local_unit(store, store.resolve_unit(ref)) for ref in (a, b))
    if ua.config["split_fingerprint"] != ub.config["split_fingerprint"]:
        raise StoreError(f"{a} and {b} were evaluated on different splits; compare runs of the same dataset and protocol")
    results = []
    for unit in (ua, ub):
        frame = unit.per_user()
        check_unit(unit, frame)
        results.append(to_result(unit, frame))
    return compare_units(*results, metrics, n_permutations=n_permutations)
