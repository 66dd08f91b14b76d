"""The run store: `runs/<run-id>/` with the resolved config, a manifest, and per method/seed

    <label>/seed-<s>/config.json     method, params, seed, split fingerprint, candidates, key
                    rankings.jsonl  user, uid, target, top-k internal item ids, scores
                    per_user.jsonl  user, uid and each metric (and method extras such as validity)
                    metrics.json    means, timings, peak memory, method info

A unit directory appears only complete: it is written under a temporary name and renamed.
A finished unit with the same key (method, params, seed, split, candidates, users) is reused.
Files and directories get the modes the process umask allows (as `open`/`mkdir` would), not
the 0600/0700 of `tempfile`. An OSError while writing names the file it was writing.
"""

from __future__ import annotations

import contextlib
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


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (no race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode `open()` (0666) or `mkdir()` (0777) would give under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `parent`, with the umask's directory mode instead of 0700."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, umask_mode(directory=True))
    return tmp


@contextlib.contextmanager
def naming_path(path: Path, always: bool = False) -> Iterator[None]:
    """Give an OSError raised without a file name (a full disk during write()) the path written;
    `always`: also in place of a temporary file's name."""
    try:
        yield
    except OSError as exc:
        if always or exc.filename is None:
            exc.filename = str(path)
        raise


def _atomic_write(path: Path, data: bytes, sync: bool) -> None:
    path = Path(path)
    with naming_path(path, always=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, umask_mode())
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if sync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, text.encode("utf-8"), sync=False)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, data, sync=True)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with naming_path(path), open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file of the store; StoreError naming it when it is damaged (truncated, not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(
            f"{path} is damaged (not complete JSON: {exc}); delete {path.parent} and rerun the command that made it"
        ) from exc


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise StoreError(
                        f"{path}:{lineno} is not valid JSON ({exc}); delete {Path(path).parent} and rerun the "
                        "command that made it"
                    ) from exc


def unit_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(dumps(payload).encode()).hexdigest()[:20]


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final`. An existing `final` is moved aside (to a dot
    name beside it) and deleted only once the new one is in place: an error restores it, and a
    crash (kill -9) leaves the old unit complete, in place or aside, or the new one; never a mix."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class UnitFiles:
    """What a finished unit directory holds, loaded lazily."""

    path: Path

    @property
    def config(self) -> dict:
        return read_json(self.path / "config.json")

    @property
    def metrics(self) -> dict:
        return read_json(self.path / "metrics.json")

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
        meta = read_json(path) if path.is_file() else {}
        meta.update(fields)
        atomic_write_text(path, dumps(meta) + "\n")

    def record_failure(self, run_id: str, exc: BaseException) -> None:
        """Mark a run "failed" (or "interrupted") with the error's first line; a store that cannot be
        written (read-only, full) stays as it is, and the error itself still reaches the caller."""
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        text = (str(exc).strip().splitlines() or [""])[0][:500]
        try:
            self.update_run(run_id, status=status, error=f"{type(exc).__name__}: {text}".rstrip(": "))
        except (OSError, StoreError):
            pass

    def run_meta(self, run_id: str) -> dict:
        path = self.run_dir(run_id) / "run.json"
        if not path.is_file():
            raise StoreError(f"run {run_id!r} not found under {self.root}; list runs with `python -m benchmark runs`")
        return read_json(path)

    def runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "run.json").is_file())

    def orphans(self) -> list[str]:
        """Run directories that hold finished units but no run.json (deleted by hand)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if not p.name.startswith(".") and p.is_dir() and not (p / "run.json").is_file()
            and any(p.glob("*/seed-*/metrics.json"))
        )

    # -- units ---------------------------------------------------------------------------
    def finished_units(self, orphans: bool = False) -> Iterator[UnitFiles]:
        """Finished units of every run; with `orphans`, also those of run directories without run.json."""
        for run_id in sorted(self.runs() + (self.orphans() if orphans else [])):
            for metrics in sorted(self.run_dir(run_id).glob("*/seed-*/metrics.json")):
                yield UnitFiles(metrics.parent)

    def find_finished(self, key: str) -> UnitFiles | None:
        """The most recent finished unit with this key, if any."""
        found = None
        for unit in self.finished_units(orphans=True):
            try:
                if unit.config.get("key") == key:
                    found = unit
            except (OSError, StoreError):  # a damaged unit is never reused: it is recomputed
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
        tmp = make_temp_dir(final.parent, f".seed-{seed}.")
        try:
            atomic_write_text(tmp / "config.json", dumps(config) + "\n")
            write_jsonl(tmp / "rankings.jsonl", rankings)
            write_jsonl(tmp / "per_user.jsonl", per_user)
            atomic_write_text(tmp / "metrics.json", json.dumps(metrics, sort_keys=True, indent=1, default=_json_default) + "\n")
            _swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                final.parent.rmdir()  # the label's directory, when this was to be its first unit
            raise
        return final

    def copy_unit(self, source: UnitFiles, run_id: str, label: str, seed: int) -> Path:
        final = self.unit_dir(run_id, label, seed)
        if final.resolve() == source.path.resolve():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".seed-{seed}."))
        shutil.rmtree(tmp)
        try:
            with naming_path(tmp):
                shutil.copytree(source.path, tmp)
            os.chmod(tmp, umask_mode(directory=True))  # units written before the umask was respected were 0700/0600
            for child in tmp.iterdir():
                os.chmod(child, umask_mode())
            _swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def resolve_unit(self, ref: str) -> UnitFiles:
        """RUN_ID/LABEL[/seed-S] -> the unit (the only seed, or seed given)."""
        parts = ref.strip("/").split("/")
        if len(parts) not in (2, 3) or any(part in ("", ".", "..") for part in parts):
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
