"""The run store: `runs/<run-id>/` with the resolved config, a manifest, and per method/seed

    <label>/seed-<s>/config.json     method, params, seed, split fingerprint, candidates, key
                    rankings.jsonl  user, uid, target, top-k internal item ids, scores
                    per_user.jsonl  user, uid and each metric (and method extras such as validity)
                    metrics.json    means, timings, peak memory, method info

A unit directory appears only complete: it is written under a temporary name and renamed.
A finished unit with the same key (method, params, seed, split, candidates, users) is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from benchmark.errors import StoreError


def dumps(obj: Any) -> str:
    """Deterministic JSON (sorted keys, numpy scalars converted)."""
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise StoreError(f"{path}:{lineno} is not valid JSON ({exc}); delete the run or rerun with --force") from exc


def unit_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(dumps(payload).encode()).hexdigest()[:20]


@dataclass
class UnitFiles:
    """What a finished unit directory holds, loaded lazily."""

    path: Path

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def per_user(self) -> pd.DataFrame:
        df = pd.DataFrame(list(read_jsonl(self.path / "per_user.jsonl")))
        if "user" in df:
            df["user"] = df["user"].astype(str)
        return df

    def rankings(self) -> dict[int, list[int]]:
        return {int(r["uid"]): [int(i) for i in r["items"]] for r in read_jsonl(self.path / "rankings.jsonl")}


class RunStore:
    """All runs under one root (default ./runs)."""

    def __init__(self, root: Path | str = "runs"):
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def unit_dir(self, run_id: str, label: str, seed: int) -> Path:
        return self.run_dir(run_id) / label / f"seed-{seed}"

    def work_dir(self, key: str) -> Path:
        """Checkpoints of an unfinished unit, keyed by its config: a rerun resumes from them.

        Not created here: a method that checkpoints creates it (most never need one)."""
        return self.root / ".work" / key

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    # -- runs ----------------------------------------------------------------------------
    def start_run(self, run_id: str, meta: dict[str, Any]) -> Path:
        path = self.run_dir(run_id)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "run.json", dumps(meta) + "\n")
        return path

    def update_run(self, run_id: str, **fields: Any) -> None:
        path = self.run_dir(run_id) / "run.json"
        meta = json.loads(path.read_text()) if path.is_file() else {}
        meta.update(fields)
        atomic_write_text(path, dumps(meta) + "\n")

    def run_meta(self, run_id: str) -> dict:
        path = self.run_dir(run_id) / "run.json"
        if not path.is_file():
            raise StoreError(f"run {run_id!r} not found under {self.root}; list runs with `python -m benchmark runs`")
        return json.loads(path.read_text())

    def runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "run.json").is_file())

    # -- units ---------------------------------------------------------------------------
    def finished_units(self) -> Iterator[UnitFiles]:
        for run_id in self.runs():
            for metrics in sorted(self.run_dir(run_id).glob("*/seed-*/metrics.json")):
                yield UnitFiles(metrics.parent)

    def find_finished(self, key: str) -> UnitFiles | None:
        """The most recent finished unit with this key, if any."""
        found = None
        for unit in self.finished_units():
            try:
                if unit.config.get("key") == key:
                    found = unit
            except (OSError, json.JSONDecodeError):
                continue
        return found

    def write_unit(
        self,
        run_id: str,
        label: str,
        seed: int,
        config: dict,
        rankings: Iterable[dict],
        per_user: Iterable[dict],
        metrics: dict,
    ) -> Path:
        final = self.unit_dir(run_id, label, seed)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".seed-{seed}."))
        try:
            atomic_write_text(tmp / "config.json", dumps(config) + "\n")
            write_jsonl(tmp / "rankings.jsonl", rankings)
            write_jsonl(tmp / "per_user.jsonl", per_user)
            atomic_write_text(tmp / "metrics.json", json.dumps(metrics, sort_keys=True, indent=1, default=_json_default) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def copy_unit(self, source: UnitFiles, run_id: str, label: str, seed: int) -> Path:
        final = self.unit_dir(run_id, label, seed)
        if final.resolve() == source.path.resolve():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".seed-{seed}."))
        shutil.rmtree(tmp)
        shutil.copytree(source.path, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def resolve_unit(self, ref: str) -> UnitFiles:
        """RUN_ID/LABEL[/seed-S] -> the unit (the only seed, or seed given)."""
        parts = ref.strip("/").split("/")
        if len(parts) not in (2, 3):
            raise StoreError(f"bad reference {ref!r}; write RUN_ID/METHOD or RUN_ID/METHOD/seed-S")
        base = self.run_dir(parts[0]) / parts[1]
        if len(parts) == 3:
            path = base / parts[2]
        else:
            seeds = sorted(base.glob("seed-*/metrics.json"))
            if not seeds:
                raise StoreError(f"{ref}: no finished results; list runs with `python -m benchmark runs`")
            if len(seeds) != 1:
                found = ", ".join(p.parent.name for p in seeds) or "none"
                raise StoreError(f"{ref}: {len(seeds)} finished seeds ({found}); add /seed-S")
            path = seeds[0].parent
        if not (path / "metrics.json").is_file():
            raise StoreError(f"{ref}: no finished results at {path}; list runs with `python -m benchmark runs`")
        return UnitFiles(path)
