"""Splits (leave-one-out, global temporal), their fingerprint, and the on-disk split cache.

loo: per user, last item = test target, second last = valid target, the rest = train;
     valid history = train sequence, test history = train sequence + valid item.
     Users with fewer than 3 interactions (possible only with --kcore < 3) stay in train only.
temporal: t1, t2 = the 80% and 90% quantiles ("lower" method, so real timestamps) of all
     interaction times. train = interactions with t < t1; a user's first interaction in
     [t1, t2) is their valid target, their first at t >= t2 their test target, each with
     every earlier interaction of theirs as history (users with no history are skipped).
     No training interaction may be at or after t1 (checked).

The split's fingerprint is sha256 over its config (without the machine-specific `source`)
and its content; the first 16 hex digits are kept. `prepare_split` caches splits under
`<cache_dir>/splits/<key>/` (npz + json, written to a temp dir then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.data.assets import sha256_file
from benchmark.data.preprocess import Prepared, preprocess
from benchmark.errors import ConfigError, DataError
from benchmark.store import make_temp_dir
from benchmark.types import Catalog, EvalSet, RawDataset, Split

PROTOCOLS = ("loo", "temporal")
SPLIT_FORMAT = 2  # bump when preprocessing or the split rules change: old caches are ignored
# 2: the config records the time range of training and test interactions ("times")
TEMPORAL_QUANTILES = (0.8, 0.9)
_EMPTY = np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------ building


def _eval_set(users: list[int], targets: list[int], histories: list[np.ndarray]) -> EvalSet:
    return EvalSet(
        users=np.asarray(users, dtype=np.int64),
        targets=np.asarray(targets, dtype=np.int64),
        histories=histories,
    )


def _loo(prep: Prepared) -> tuple[list[np.ndarray], EvalSet, EvalSet, dict[str, Any]]:
    train: list[np.ndarray] = []
    vu, vt, vh, tu, tt, th = [], [], [], [], [], []
    for user in range(prep.n_users):
        seq = prep.sequence(user)
        if len(seq) < 3:
            train.append(seq)
            continue
        train.append(seq[:-2])
        vu.append(user), vt.append(int(seq[-2])), vh.append(seq[:-2])
        tu.append(user), tt.append(int(seq[-1])), th.append(seq[:-1])
    return train, _eval_set(vu, vt, vh), _eval_set(tu, tt, th), {}


def _temporal(prep: Prepared) -> tuple[list[np.ndarray], EvalSet, EvalSet, dict[str, Any]]:
    q1, q2 = TEMPORAL_QUANTILES
    t1 = int(np.quantile(prep.timestamps, q1, method="lower"))
    t2 = int(np.quantile(prep.timestamps, q2, method="lower"))
    if t2 <= t1:
        raise DataError(
            f"{prep.dataset}: the {q1:.0%} and {q2:.0%} time quantiles coincide ({t1}); "
            "too few distinct timestamps for the temporal protocol; use --split loo"
        )
    train: list[np.ndarray] = []
    vu, vt, vh, tu, tt, th = [], [], [], [], [], []
    latest_train = np.iinfo(np.int64).min
    for user in range(prep.n_users):
        seq, times = prep.sequence(user), prep.times(user)
        cut1 = int(np.searchsorted(times, t1, side="left"))
        cut2 = int(np.searchsorted(times, t2, side="left"))
        train.append(seq[:cut1])
        if cut1:
            latest_train = max(latest_train, int(times[cut1 - 1]))
        if cut1 < cut2 and cut1 > 0:
            vu.append(user), vt.append(int(seq[cut1])), vh.append(seq[:cut1])
        if cut2 < len(seq) and cut2 > 0:
            tu.append(user), tt.append(int(seq[cut2])), th.append(seq[:cut2])
    if latest_train >= t1:
        raise DataError(
            f"{prep.dataset}: a training interaction at {latest_train} is not before the split time {t1}; "
            "the temporal split leaks, report this bug"
        )
    return train, _eval_set(vu, vt, vh), _eval_set(tu, tt, th), {"t_valid": t1, "t_test": t2}


def _time_range(prep: Prepared, train: list[np.ndarray], test: EvalSet) -> dict[str, int | None]:
    """First and last timestamps of the training interactions and of the test targets (another
    dataset used for training, e.g. CALRec's stage 1, is checked against them)."""
    train_times = [prep.times(u)[: len(seq)] for u, seq in enumerate(train) if len(seq)]
    test_times = np.array([prep.times(int(u))[len(h)] for u, h in zip(test.users, test.histories)], dtype=np.int64)
    flat = np.concatenate(train_times) if train_times else _EMPTY

    def edge(values: np.ndarray, fn) -> int | None:
        return int(fn(values)) if len(values) else None

    return {"train_min": edge(flat, np.min), "train_max": edge(flat, np.max),
            "test_min": edge(test_times, np.min), "test_max": edge(test_times, np.max)}


def split_prepared(
    prep: Prepared, protocol: str = "loo", kcore: int = 5, spec: str | None = None, source: str = ""
) -> Split:
    """Apply a protocol to preprocessed data; fills config and fingerprint."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    train, valid, test, extra = (_loo if protocol == "loo" else _temporal)(prep)
    if len(test) == 0:
        raise DataError(f"{prep.dataset}: the {protocol} split has no test user; use more data or lower --kcore")
    extra["times"] = _time_range(prep, train, test)
    config: dict[str, Any] = {
        "dataset": spec or prep.dataset,
        "protocol": protocol,
        "kcore": int(kcore),
        "format": SPLIT_FORMAT,
        "preprocess": {k: (float(v) if isinstance(v, float) else int(v)) for k, v in prep.counts.items()},
        **extra,
        "source": source,
    }
    split = Split(
        dataset=spec or prep.dataset,
        protocol=protocol,
        config=config,
        fingerprint="",
        user_ids=prep.user_ids,
        catalog=prep.catalog,
        train=train,
        valid=valid,
        test=test,
    )
    split.fingerprint = fingerprint(split)
    return split


def build_split(raw: RawDataset, protocol: str = "loo", kcore: int = 5, spec: str | None = None) -> Split:
    """Preprocess and split a RawDataset in memory (no cache)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    prep = preprocess(raw, kcore=kcore, dataset=spec or raw.name)
    return split_prepared(prep, protocol, kcore=kcore, spec=spec or raw.name, source=raw.source)


# ------------------------------------------------------------------ fingerprint


def _flat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays).astype(np.int64) if len(arrays) and lengths.sum() else _EMPTY
    return flat, lengths


def _unflat(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    if len(lengths) == 0:
        return []
    return np.split(flat, np.cumsum(lengths)[:-1])


def _hash_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "source"}


def fingerprint(split: Split) -> str:
    """sha256 of the config (minus `source`) and the content, first 16 hex digits."""
    h = hashlib.sha256()
    h.update(json.dumps(_hash_config(split.config), sort_keys=True, default=str).encode())

    def add_text(values: list[Any]) -> None:
        h.update(json.dumps(values, ensure_ascii=False, default=str).encode())

    def add_array(array: np.ndarray) -> None:
        h.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
        h.update(b"|")

    add_text([split.dataset, split.protocol, split.user_ids])
    cat = split.catalog
    add_text([cat.raw_ids, cat.titles, cat.years, cat.genres])
    for array in _flat(split.train):
        add_array(array)
    for part in (split.valid, split.test):
        add_array(part.users)
        add_array(part.targets)
        for array in _flat(part.histories):
            add_array(array)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ disk cache


def save_split(split: Split, directory: Path) -> None:
    """Write split.npz + split.json into `directory` atomically (temp dir, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(directory.parent, f".{directory.name}-")
    try:
        arrays: dict[str, np.ndarray] = {}
        arrays["train_items"], arrays["train_lengths"] = _flat(split.train)
        for name, part in (("valid", split.valid), ("test", split.test)):
            arrays[f"{name}_users"] = part.users
            arrays[f"{name}_targets"] = part.targets
            arrays[f"{name}_hist"], arrays[f"{name}_hist_lengths"] = _flat(part.histories)
        np.savez(tmp / "split.npz", **arrays)
        meta = {
            "dataset": split.dataset,
            "protocol": split.protocol,
            "config": split.config,
            "fingerprint": split.fingerprint,
            "user_ids": split.user_ids,
            "catalog": {
                "raw_ids": split.catalog.raw_ids,
                "titles": split.catalog.titles,
                "years": split.catalog.years,
                "genres": split.catalog.genres,
            },
        }
        (tmp / "split.json").write_text(json.dumps(meta, ensure_ascii=False))
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (directory / "split.json").is_file():  # not a concurrent writer's finished copy
                shutil.rmtree(directory, ignore_errors=True)
                os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_split(directory: Path) -> Split:
    """Read a split written by `save_split`; DataError if it is missing or damaged."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "split.json").read_text())
        with np.load(directory / "split.npz") as npz:
            arrays = {k: npz[k].astype(np.int64) for k in npz.files}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cached split in {directory} cannot be read ({exc}); delete that folder") from exc
    cat = meta["catalog"]
    parts = {
        name: EvalSet(
            users=arrays[f"{name}_users"],
            targets=arrays[f"{name}_targets"],
            histories=_unflat(arrays[f"{name}_hist"], arrays[f"{name}_hist_lengths"]),
        )
        for name in ("valid", "test")
    }
    split = Split(
        dataset=meta["dataset"],
        protocol=meta["protocol"],
        config=meta["config"],
        fingerprint=meta["fingerprint"],
        user_ids=meta["user_ids"],
        catalog=Catalog(cat["raw_ids"], cat["titles"], cat["years"], cat["genres"]),
        train=_unflat(arrays["train_items"], arrays["train_lengths"]),
        valid=parts["valid"],
        test=parts["test"],
    )
    if fingerprint(split) != split.fingerprint:
        raise DataError(f"cached split in {directory} does not match its fingerprint; delete that folder")
    return split


def cache_key(spec: str, files: list[Path], protocol: str, kcore: int, data_dir: Path | None) -> str:
    """Hash of the dataset spec, the content of its source files, protocol and kcore.

    Content, not path/size/mtime: a file edited in place that keeps its size and mtime
    still gets a new split."""
    payload = {
        "spec": spec,
        "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
        "files": [sha256_file(path) for path in files],
        "protocol": protocol,
        "kcore": kcore,
        "format": SPLIT_FORMAT,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def prepare_split(
    dataset: str = "ml-100k",
    protocol: str = "loo",
    kcore: int = 5,
    data_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Split:
    """Load, preprocess and split `dataset`, reusing `<cache_dir>/splits/<key>/` when present.

    cache_dir defaults to $BENCHMARK_CACHE or ~/.cache/llmrec-bench. `seed` only matters for
    generated datasets (`synthetic`) whose spec names no seed; the real datasets split
    deterministically. `progress` shows tqdm bars where a loader streams large files.
    """
    from benchmark.data import dataset_name, load_raw, source_files
    from benchmark.data.assets import default_cache_dir

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if kcore < 0:
        raise ConfigError(f"--kcore must be >= 0, got {kcore}")
    spec = dataset.strip()
    if seed is not None and dataset_name(spec) == "synthetic" and "seed" not in spec:
        spec = f"{spec}{',' if ':' in spec else ':'}seed={seed}"
    data_path = Path(data_dir) if data_dir is not None else None
    directory = None
    if use_cache:
        files = source_files(spec, data_path)
        key = cache_key(spec, files, protocol, kcore, data_path)
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        directory = root / "splits" / key
        if (directory / "split.json").is_file():
            try:
                return load_split(directory)
            except DataError:
                shutil.rmtree(directory, ignore_errors=True)  # damaged: rebuild below
    raw = load_raw(spec, data_path, **({"progress": True} if progress else {}))
    split = build_split(raw, protocol=protocol, kcore=kcore, spec=spec)
    if directory is not None:
        save_split(split, directory)
    return split
