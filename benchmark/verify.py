"""`python -m benchmark verify`: audit published leaderboards from their evidence alone.

For every published unit (row and seed):
1. recompute each per-user metric from its rankings and targets with the scorer the runner
   uses (`per_user_metrics`) and compare it with per_user.jsonl.gz, user by user;
2. run the integrity checks (ranges, each test user once and as many as the run evaluated,
   per-user means equal to metrics.json);
3. check the sha256 digests evidence.json recorded at publication;
then check that every unit holds the same user set as recorded, that a `full` candidate
fingerprint follows from the split fingerprint, and that each row of the leaderboard's JSON
(means and seed means) follows from the per-user values. With `--check-split` the dataset is
split again here: its fingerprint, test users (or the seeded --eval-users subsample) and
targets must be the published ones.

Any failure is an IntegrityError of one line naming the row, the user and the metric.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.candidates import candidate_fingerprint, parse_protocol
from benchmark.errors import ConfigError, IntegrityError, StoreError
from benchmark.evidence import INDEX, JSONL, Evidence, Unit, read_evidence
from benchmark.integrity import MEAN_RTOL, check_published_users, check_same_users, check_unit
from benchmark.scoring.metrics import METRIC_NAMES, parse_metric, per_user_metrics
from benchmark.types import PAD

VALUE_ATOL = 1e-12  # recomputed per-user values come from the same float64 code: equal up to rounding


def ranking_matrix(unit: Unit) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(raw users, internal user ids, targets, [users, k] PAD-filled item ids) from rankings.jsonl."""
    rows = unit.rows("rankings.jsonl")
    k = max([int(unit.config.get("k") or 0)] + [len(r["items"]) for r in rows])
    items = np.full((len(rows), k), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        items[i, : len(r["items"])] = r["items"]
    users = [str(r["user"]) for r in rows]
    uids = np.array([int(r["uid"]) for r in rows], dtype=np.int64)
    targets = np.array([int(r["target"]) for r in rows], dtype=np.int64)
    return users, uids, targets, items


def recomputable(columns, k: int) -> list[str]:
    """The per-user columns the scorer produces from a ranking of length k (hr/ndcg/mrr/recall@K<=k)."""
    out = []
    for c in columns:
        if c.split("@")[0] in METRIC_NAMES:
            _, cutoff = parse_metric(c)
            if cutoff <= k:
                out.append(c)
    return out


def verify_unit(unit: Unit, frame: pd.DataFrame) -> int:
    """Recompute the unit's metrics from its rankings; returns how many per-user columns were checked."""
    users, _, targets, items = ranking_matrix(unit)
    if len(set(users)) != len(users) or set(users) != set(frame["user"]):
        raise IntegrityError(
            f"{unit.where}: rankings.jsonl and per_user.jsonl hold different users "
            f"({len(users)} ranked, {len(frame)} scored); restore the published files (git checkout)"
        )
    columns = recomputable(frame.columns, items.shape[1])
    if not columns:
        raise IntegrityError(f"{unit.where}: per_user.jsonl has no metric column to recompute")
    cutoffs = sorted({parse_metric(c)[1] for c in columns})
    try:
        recomputed = per_user_metrics(items, targets, cutoffs)
    except ValueError as exc:
        raise IntegrityError(f"{unit.where}: its rankings cannot be scored ({exc})") from None
    stored = frame.set_index("user").loc[users]
    for metric in columns:
        got = stored[metric].to_numpy(dtype=np.float64)
        bad = ~np.isclose(got, recomputed[metric], rtol=0.0, atol=VALUE_ATOL)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise IntegrityError(
                f"{unit.where}: user {users[i]!r} has {metric} = {float(got[i])!r} in per_user.jsonl but its ranking "
                f"and target give {float(recomputed[metric][i])!r} ({int(bad.sum())} mismatching value(s) of {metric})"
            )
    return len(columns)


def check_digests(evidence: Evidence, unit: Unit) -> None:
    entry = next(e for e in evidence.index["units"] if e["label"] == unit.label and int(e["seed"]) == unit.seed)
    for name in JSONL:
        recorded = entry.get(f"{name.split('.')[0]}_sha256")
        if recorded != unit.digest(name):
            raise IntegrityError(
                f"{unit.where}: {name}.gz is not the file published (sha256 {unit.digest(name)[:16]}… vs "
                f"{str(recorded)[:16]}… in {INDEX}); restore it (git checkout) or republish"
            )


def check_leaderboard_json(evidence: Evidence, frames: list[tuple[Unit, pd.DataFrame]]) -> int:
    """Each row of <stem>.json: its seeds are the evidence's, its means follow from the per-user values."""
    path = evidence.folder.parent / f"{evidence.folder.name}.json"
    if not path.is_file():
        return 0
    board = json.loads(path.read_text())
    if "metric" in board and all("unit" in r or r.get("carried") for r in board.get("rows", [])):
        return check_report_json(path, board, frames)
    by_label: dict[str, list[tuple[Unit, pd.DataFrame]]] = {}
    for unit, frame in frames:
        by_label.setdefault(unit.label, []).append((unit, frame))
    rows = {r["label"]: r for r in board.get("rows", [])}
    if set(rows) != set(by_label):
        raise IntegrityError(
            f"{path}: rows {sorted(rows)} but the evidence holds {sorted(by_label)}; republish the leaderboard"
        )
    for label, group in sorted(by_label.items()):
        row = rows[label]
        seeds = sorted(u.seed for u, _ in group)
        if sorted(row["seeds"]) != seeds:
            raise IntegrityError(f"{path}: row {label!r} lists seeds {row['seeds']} but the evidence holds {seeds}")
        for metric, cell in row["metrics"].items():
            if any(metric not in f for _, f in group):
                raise IntegrityError(f"{path}: row {label!r} shows {metric} but its per-user files lack that column")
            per_seed = [f.set_index("user")[metric] for _, f in sorted(group, key=lambda g: g[0].seed)]
            mean = float(pd.concat(per_seed, axis=1).mean(axis=1).mean())
            if not math.isclose(mean, cell["mean"], rel_tol=MEAN_RTOL, abs_tol=1e-12):
                raise IntegrityError(
                    f"{path}: row {label!r} shows {metric} mean {cell['mean']!r} but its per-user values give {mean!r}"
                )
    return len(rows)


def check_report_json(path: Path, board: dict, frames: list[tuple[Unit, pd.DataFrame]]) -> int:
    """A report such as the learning curve: one unit per row (`unit`: label and seed), its `mean` of the
    report's `metric` follows from that unit's per-user values; rows marked `carried` have no evidence."""
    units = {(u.label, u.seed): f for u, f in frames}
    rows = [r for r in board["rows"] if not r.get("carried")]
    wanted = {(r["unit"]["label"], int(r["unit"]["seed"])) for r in rows}
    if wanted != set(units):
        raise IntegrityError(f"{path}: rows stand on units {sorted(wanted)} but the evidence holds {sorted(units)}; "
                             "regenerate the report")
    metric = board["metric"]
    for r in rows:
        frame = units[(r["unit"]["label"], int(r["unit"]["seed"]))]
        if metric not in frame:
            raise IntegrityError(f"{path}: row {r['label']!r} shows {metric} but its per-user file lacks that column")
        mean = float(frame[metric].mean())
        if not math.isclose(mean, r["mean"], rel_tol=MEAN_RTOL, abs_tol=1e-12):
            raise IntegrityError(f"{path}: row {r['label']!r} shows {metric} mean {r['mean']!r} but its per-user "
                                 f"values give {mean!r}")
    return len(rows)


def check_split(evidence: Evidence, frames: list[tuple[Unit, pd.DataFrame]], cache_dir: Path, data_dir) -> str:
    """Split the dataset again: same fingerprint, same test users (or subsample) and targets."""
    from benchmark.data.split import prepare_split
    from benchmark.runner import subsample_users

    # the split settings of a run with a published manifest, else the unit's config.json (k-core 5, the
    # default: a different one would split to another fingerprint, which the check below refuses)
    run = next((u.run for u, _ in frames if u.run), {})
    split = prepare_split(
        evidence.index["dataset"], protocol=run.get("split") or frames[0][0].config.get("split", "loo"), kcore=int(run.get("split_config", {}).get("kcore", 5)),
        data_dir=data_dir, cache_dir=cache_dir,
    )
    if split.fingerprint != evidence.index["split_fingerprint"]:
        raise IntegrityError(
            f"{evidence.folder}/: the dataset here splits to fingerprint {split.fingerprint} but the evidence was "
            f"published on {evidence.index['split_fingerprint']}; another dataset version or preprocessing"
        )
    test = subsample_users(split.test, evidence.index.get("eval_users"))
    truth = {split.user_ids[int(u)]: int(t) for u, t in zip(test.users, test.targets)}
    for unit, _ in frames:
        users, _, targets, _ = ranking_matrix(unit)
        if set(users) != set(truth):
            raise IntegrityError(f"{unit.where}: its users are not this protocol's {len(truth)} test users")
        wrong = [u for u, t in zip(users, targets) if truth[u] != int(t)]
        if wrong:
            raise IntegrityError(
                f"{unit.where}: user {wrong[0]!r} has target {truth[wrong[0]]} in the split but "
                f"{int(targets[users.index(wrong[0])])} in rankings.jsonl ({len(wrong)} wrong target(s))"
            )
    return f"split {split.fingerprint}: {len(truth)} test users and their targets match"


def verify_folder(folder: Path, *, check_data: bool = False, cache_dir: Path | None = None, data_dir=None) -> list[str]:
    """Audit one evidence folder; returns report lines, raises IntegrityError on the first failure."""
    evidence = read_evidence(folder)
    if evidence is None:
        raise StoreError(f"{folder}/ holds no {INDEX}: that leaderboard was published without evidence")
    if not evidence.units:
        raise IntegrityError(f"{folder}/{INDEX} lists no units")
    lines = []
    frames = []
    for unit in evidence.units:
        frame = unit.per_user()
        n_metrics = verify_unit(unit, frame)
        check_unit(unit, frame)
        check_digests(evidence, unit)
        frames.append((unit, frame))
        lines.append(f"ok  {unit.label} seed {unit.seed}: {len(frame)} users, {n_metrics} per-user metrics recomputed "
                     "from rankings and targets, means equal metrics.json")
    users = check_same_users(frames, None, "")
    check_published_users(evidence, users)
    protocol = evidence.index.get("candidates") or "full"
    if parse_protocol(protocol)[0] == "full":
        expected = candidate_fingerprint(protocol, evidence.index["split_fingerprint"])
        if expected != evidence.index["candidate_fingerprint"]:
            raise IntegrityError(
                f"{folder}/{INDEX}: candidate fingerprint {evidence.index['candidate_fingerprint']} but full candidates "
                f"on split {evidence.index['split_fingerprint']} give {expected}"
            )
    n_rows = check_leaderboard_json(evidence, frames)
    lines.append(f"ok  {folder}: {len(evidence.units)} unit(s), {n_rows} leaderboard row(s), "
                 f"{len(users)} identical test users in every unit")
    if evidence.runs_without_manifest:
        lines.append(f"note {folder}: no run manifest (run.json) for run(s) {', '.join(evidence.runs_without_manifest)}: "
                     "they were published before .gitignore was anchored and never reached git, so their versions, "
                     "machine and timings are only what each unit's config.json and metrics.json state")
    if check_data:
        lines.append("ok  " + check_split(evidence, frames, cache_dir, data_dir))
    return lines


def evidence_folders(target: Path | None, leaderboards: Path, dataset: str | None, protocol: str | None) -> list[Path]:
    """What `verify` audits: PATH (a folder, or a leaderboard's .md/.json), a dataset/protocol, or every folder."""
    from benchmark.render import leaderboard_stem

    if target is not None:
        target = Path(target)
        return [target.with_suffix("") if target.suffix in (".md", ".json") else target]
    if dataset is not None:
        if protocol is None:
            raise ConfigError("verify --dataset needs --protocol too, e.g. --protocol loo-full")
        return [Path(leaderboards) / leaderboard_stem(dataset, protocol)]
    folders = sorted(p.parent for p in Path(leaderboards).glob(f"*/{INDEX}"))
    if not folders and not any(Path(leaderboards).glob("*.md")):
        raise StoreError(f"no published leaderboard under {leaderboards}/; publish with `run --publish` or `leaderboard`")
    return folders
