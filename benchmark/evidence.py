"""Published evidence: what stands behind every row of a leaderboard, committed beside it.

    leaderboards/<dataset>-<protocol>/
        evidence.json                     index: dataset, protocol, split and candidate
                                          fingerprints, the test-user set's fingerprint and
                                          size, and per unit its folder and sha256 digests
        runs/<run-id>.json                the run manifest (run.json, copied whole)
        units/<label>/seed-<s>/
            config.json, metrics.json     copied whole from the run store
            per_user.jsonl.gz             per_user.jsonl: each metric per user
            rankings.jsonl.gz             rankings.jsonl without scores: user, uid, target, top-k ids

Scores are left out of the published rankings: the metrics follow from the ids and targets
alone, and float scores would double the size (ML-1M: ~320 KB instead of ~660 KB for a row
of random floats); the run store keeps them. The .gz files are gzip without a timestamp or file name, so the same data gives the same
bytes; a unit whose data is unchanged keeps its files byte for byte (even under another
zlib), so republishing unchanged rows leaves `git diff` empty. A `Unit` is one finished
(label, seed) evaluation from either source, the local run store or published evidence;
everything downstream (integrity checks, the leaderboard, `verify`) reads units alike.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.candidates import candidate_fingerprint, parse_protocol, stored_path
from benchmark.errors import StoreError
from benchmark.store import RunStore, UnitFiles, dumps, make_temp_dir

FORMAT = 1
INDEX = "evidence.json"
JSONL = ("per_user.jsonl", "rankings.jsonl")  # stored gzipped in evidence
JSON = ("config.json", "metrics.json")  # stored as they are


@dataclass(eq=False)
class Unit:
    """One finished (label, seed) evaluation: its folder, parsed config/metrics and its run's run.json."""

    folder: Path
    config: dict
    metrics: dict
    run: dict
    published: bool  # read from published evidence (jsonl files gzipped) rather than the run store
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return str(self.config["label"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def run_id(self) -> str:
        return str(self.config["run_id"])

    @property
    def where(self) -> str:
        return f"{self.label} seed {self.seed} ({self.folder})"

    def read(self, name: str) -> bytes:
        """A file of the unit as the run store holds it (evidence .gz files come back decompressed)."""
        if name not in self._cache:
            path = self.folder / (f"{name}.gz" if self.published and name in JSONL else name)
            if not path.is_file():
                raise StoreError(f"{self.where}: {path.name} is missing; restore it (git checkout) or rerun the unit")
            data = path.read_bytes()
            self._cache[name] = gzip.decompress(data) if path.suffix == ".gz" else data
        return self._cache[name]

    def published_bytes(self, name: str) -> bytes:
        """A file as evidence holds it (decompressed): the run store's rankings lose their scores."""
        if self.published or name != "rankings.jsonl":
            return self.read(name)
        key = f"{name}:published"
        if key not in self._cache:
            rows = ({k: v for k, v in row.items() if k != "scores"} for row in self.rows(name))
            self._cache[key] = "".join(dumps(row) + "\n" for row in rows).encode("utf-8")
        return self._cache[key]

    def digest(self, name: str) -> str:
        """sha256 of the file as evidence holds it (so a local unit and its published copy agree)."""
        return hashlib.sha256(self.published_bytes(name)).hexdigest()

    def rows(self, name: str) -> list[dict]:
        out = []
        for lineno, line in enumerate(self.read(name).decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise StoreError(f"{self.where}: {name} line {lineno} is not valid JSON ({exc})") from None
        return out

    def per_user(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows("per_user.jsonl"))
        if "user" not in frame:
            raise StoreError(f"{self.where}: per_user.jsonl has no 'user' column; rerun the unit")
        frame["user"] = frame["user"].astype(str)
        return frame

    def same_as(self, other: Unit) -> bool:
        """The same evaluation: the same unit key (method, params, seed, split, candidates, users, k;
        the whole config where there is no key) and byte-identical per-user values and rankings."""
        mine, theirs = self.config.get("key"), other.config.get("key")
        if mine is None or theirs is None:
            mine, theirs = self.config, other.config
        return mine == theirs and all(self.digest(n) == other.digest(n) for n in JSONL)


def local_unit(store: RunStore, files: UnitFiles) -> Unit:
    """A unit of the run store, with the run.json of the run that produced it (a reused unit keeps its
    first run's id; the run folder it was copied into stands in when that run is gone)."""
    config = files.config
    run_json = store.run_dir(str(config.get("run_id"))) / "run.json"
    if not run_json.is_file():
        run_json = files.path.parent.parent / "run.json"
    run = json.loads(run_json.read_text()) if run_json.is_file() else {}
    return Unit(files.path, config, files.metrics, run, published=False)


def users_fingerprint(users) -> str:
    """A hash of the set of raw test-user ids (order-free)."""
    return hashlib.sha256("\n".join(sorted(str(u) for u in users)).encode()).hexdigest()[:16]


def unit_candidate_fingerprint(unit: Unit, cache_dir: Path) -> str:
    """The candidate fingerprint of a local unit; non-full protocols read their stored arrays."""
    protocol = str(unit.config.get("candidates", "full"))
    split_fp = str(unit.config["split_fingerprint"])
    if parse_protocol(protocol)[0] == "full":
        return candidate_fingerprint(protocol, split_fp)
    rows = unit.rows("rankings.jsonl")
    users = np.array([int(r["uid"]) for r in rows], dtype=np.int64)
    targets = np.array([int(r["target"]) for r in rows], dtype=np.int64)
    path = stored_path(cache_dir, split_fp, protocol, users, targets, source=unit.config.get("candidates_source"))
    if not path.is_file():
        raise StoreError(
            f"{unit.where}: its {protocol} candidate set ({path}) is gone, so it cannot be fingerprinted; "
            "rerun the unit with --force to rebuild it"
        )
    with np.load(path) as z:
        return candidate_fingerprint(protocol, split_fp, z["users"], z["items"])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def unit_path(unit: Unit) -> str:
    return f"units/{_safe(unit.label)}/seed-{unit.seed}"


# ----------------------------------------------------------------------------- reading


@dataclass
class Evidence:
    folder: Path
    index: dict
    units: list[Unit]
    # runs whose run.json is not in the folder: published before the repository's .gitignore was anchored
    # (a bare `runs/` kept every leaderboards/<board>/runs/ out of git). Their units read as run {}: the
    # checks fall back on each unit's config.json and metrics.json, which hold what they need.
    runs_without_manifest: list[str] = field(default_factory=list)


def read_evidence(folder: Path) -> Evidence | None:
    """The published evidence in `folder`, or None where there is none (a legacy leaderboard)."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); restore it (git checkout) or republish") from None
    if index.get("format") != FORMAT:
        raise StoreError(f"{path} has evidence format {index.get('format')!r}; this harness reads format {FORMAT}")
    units, unmanifested = [], set(index.get("runs_without_manifest", []))
    for entry in index.get("units", []):
        unit_dir = folder / entry["path"]
        run_path = folder / "runs" / f"{_safe(entry['run_id'])}.json"
        try:
            config, metrics = (json.loads((unit_dir / name).read_text()) for name in JSON)
            if entry["run_id"] in unmanifested and not run_path.is_file():
                run = {}  # the index says so: never published (see Evidence.runs_without_manifest)
            else:
                run = json.loads(run_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{folder}: unit {entry['path']} cannot be read ({exc}); restore it (git checkout)") from None
        units.append(Unit(unit_dir, config, metrics, run, published=True))
    return Evidence(folder, index, units, sorted(unmanifested))


# ----------------------------------------------------------------------------- writing


def evidence_index(units: list[Unit], *, dataset: str, protocol: str, candidate_fp: str, users: list[str]) -> dict:
    first = units[0].config
    missing = sorted({u.run_id for u in units if not u.run})
    return {
        "format": FORMAT,
        "dataset": dataset,
        "protocol": protocol,
        "split_fingerprint": first["split_fingerprint"],
        "candidates": first.get("candidates"),
        "candidate_fingerprint": candidate_fp,
        "eval_users": first.get("eval_users"),
        "n_users": len(users),
        "users_fingerprint": users_fingerprint(users),
        "units": [
            {
                "label": u.label,
                "seed": u.seed,
                "run_id": u.run_id,
                "path": unit_path(u),
                **{f"{name.split('.')[0]}_sha256": u.digest(name) for name in JSONL},
            }
            for u in sorted(units, key=lambda u: (u.label, u.seed))
        ],
        **({"runs_without_manifest": missing} if missing else {}),
    }


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _unit_files(unit: Unit, twin: Unit | None) -> dict[str, bytes]:
    """File name -> bytes for one unit folder; a published twin with the same data keeps its bytes."""
    source = twin if twin is not None else unit
    if source.published:
        return {name: (source.folder / name).read_bytes() for name in (*JSON, *(f"{n}.gz" for n in JSONL))}
    out = {name: source.read(name) for name in JSON}
    out.update({f"{name}.gz": gzip.compress(source.published_bytes(name), compresslevel=9, mtime=0) for name in JSONL})
    return out


def write_evidence(folder: Path, units: list[Unit], index: dict, previous: Evidence | None) -> Path:
    """Write the whole evidence folder afresh (a temporary folder swapped in), so rows that left
    the leaderboard leave no files behind; unchanged units and runs keep their bytes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = previous.units if previous is not None else []
    tmp = make_temp_dir(folder.parent, prefix=f".{folder.name}.evidence-")
    try:
        runs: dict[str, bytes] = {}
        for unit in units:
            twin = unit if unit.published else next((p for p in old if p.same_as(unit)), None)
            target = tmp / unit_path(unit)
            target.mkdir(parents=True)
            for name, data in _unit_files(unit, twin).items():
                (target / name).write_bytes(data)
            if (twin or unit).run:  # a run whose manifest was never published stays without one
                runs.setdefault(unit.run_id, _json_bytes((twin or unit).run))
        (tmp / "runs").mkdir(exist_ok=True)
        for run_id, data in sorted(runs.items()):
            (tmp / "runs" / f"{_safe(run_id)}.json").write_bytes(data)
        (tmp / INDEX).write_bytes(_json_bytes(index))
        if folder.exists():
            retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.retired-"))
            os.replace(folder, retired / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
