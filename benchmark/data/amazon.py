"""Amazon Reviews loader: `amazon:<file-stem>` from a local directory (default ./data/amazon).

Two public formats, told apart per record by its keys:
  2018 (McAuley lab): <stem>.json[.gz] reviews {reviewerID, asin, unixReviewTime (s), overall}
                      meta_<stem>.json[.gz] {asin, title, category: [...]}
  2023 (McAuley lab): <stem>.jsonl[.gz] reviews {user_id, parent_asin|asin, timestamp (ms), rating}
                      meta_<stem>.jsonl[.gz] {parent_asin, title, categories: [...]}
Files are read one line at a time. Timestamps keep the source's unit. The 2014 "loose
JSON" (Python dict literals) is accepted too. A 5-core review file `<stem>_5` falls back to
the meta file of `<stem>`.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from benchmark.errors import DataError
from benchmark.types import RawDataset

DEFAULT_DIR = Path("data") / "amazon"
_SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json")
_YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")


def _stem(spec: str) -> str:
    _, _, stem = spec.partition(":")
    stem = stem.strip()
    if not stem:
        raise DataError("amazon needs a file stem: write amazon:<stem>, e.g. amazon:Beauty for Beauty.json.gz")
    return stem


def _directories(data_dir: Path | None) -> list[Path]:
    if data_dir is None:
        return [DEFAULT_DIR]
    return [Path(data_dir), Path(data_dir) / "amazon"]


def _find(names: list[str], dirs: list[Path]) -> Path | None:
    for folder in dirs:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _not_found(what: str, names: list[str], dirs: list[Path]) -> DataError:
    where = " or ".join(str(d) for d in dirs)
    return DataError(
        f"Amazon {what} not found: tried {', '.join(names)} in {where}; download them "
        f"(Amazon Reviews 2018 or 2023) into that directory or pass --data-dir"
    )


def locate(spec: str, data_dir: Path | None) -> tuple[Path, Path]:
    """(reviews file, meta file) for `amazon:<stem>`; DataError naming what was tried."""
    stem = _stem(spec)
    dirs = _directories(data_dir)
    review_names = [stem + s for s in _SUFFIXES]
    reviews = _find(review_names, dirs)
    if reviews is None:
        raise _not_found("reviews", review_names, dirs)
    meta_stems = [stem] + ([stem[:-2]] if stem.endswith("_5") else [])
    meta_names = [f"meta_{m}{s}" for m in meta_stems for s in _SUFFIXES]
    meta = _find(meta_names, [reviews.parent, *dirs])
    if meta is None:
        raise _not_found("metadata (item titles)", meta_names, dirs)
    return reviews, meta


def source_files(spec: str, data_dir: Path | None) -> list[Path]:
    return list(locate(spec, data_dir))


def _open(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _records(path: Path, progress: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-empty line."""
    try:
        with _open(path) as fh:
            lines = tqdm(fh, desc=f"reading {path.name}", unit=" lines", disable=not progress)
            for lineno, line in enumerate(lines, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        record = ast.literal_eval(line)
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        raise DataError(f"{path} line {lineno}: not a JSON object") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {lineno}: not a JSON object")
                yield lineno, record
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); is the download complete?") from exc


def _field(record: dict, names: tuple[str, ...], path: Path, lineno: int):
    for name in names:
        value = record.get(name)
        if value not in (None, ""):
            return value
    raise DataError(f"{path} line {lineno}: no {' or '.join(names)} field")


def _read_reviews(path: Path, progress: bool = False) -> pd.DataFrame:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    for lineno, rec in _records(path, progress):
        users.append(str(_field(rec, ("reviewerID", "user_id"), path, lineno)))
        items.append(str(_field(rec, ("parent_asin", "asin"), path, lineno)))
        stamp = _field(rec, ("unixReviewTime", "timestamp"), path, lineno)
        try:
            times.append(int(stamp))
        except (TypeError, ValueError):
            raise DataError(f"{path} line {lineno}: timestamp {stamp!r} is not an integer") from None
        rating = rec.get("overall", rec.get("rating"))
        try:
            ratings.append(float(rating) if rating is not None else np.nan)
        except (TypeError, ValueError):
            ratings.append(np.nan)
    if not users:
        raise DataError(f"{path} holds no reviews")
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype=str),
            "item": pd.Series(items, dtype=str),
            "timestamp": np.asarray(times, dtype=np.int64),
            "rating": np.asarray(ratings, dtype=float),
        }
    )


def _genres(rec: dict) -> str:
    cats = rec.get("categories", rec.get("category"))
    if isinstance(cats, list):
        flat = [c for c in cats if isinstance(c, str)]
        if not flat and cats and isinstance(cats[0], list):  # 2014: [["Beauty", "Makeup"]]
            flat = [c for c in cats[0] if isinstance(c, str)]
        if flat:
            return "|".join(html.unescape(c).strip() for c in flat if c.strip())
    main = rec.get("main_category")
    return str(main).strip() if main else ""


def _read_meta(path: Path, wanted: set[str], progress: bool = False) -> pd.DataFrame:
    ids, titles, years, genres = [], [], [], []
    for lineno, rec in _records(path, progress):
        item = rec.get("parent_asin") or rec.get("asin")
        if item is None:
            raise DataError(f"{path} line {lineno}: no parent_asin or asin field")
        item = str(item)
        if item not in wanted:
            continue
        wanted.discard(item)  # first record of an item wins
        title = rec.get("title")
        title = html.unescape(str(title)).strip() if title else ""
        match = _YEAR.search(str(rec.get("date") or ""))
        ids.append(item)
        titles.append(" ".join(title.split()))
        years.append(int(match.group(1)) if match else None)
        genres.append(_genres(rec))
    return pd.DataFrame(
        {
            "item": pd.Series(ids, dtype=str),
            "title": pd.Series(titles, dtype=str),
            "year": pd.array(years, dtype="Int64"),
            "genres": pd.Series(genres, dtype=str),
        }
    )


def load_amazon(spec: str, data_dir: Path | None = None, **opts) -> RawDataset:
    """Amazon Reviews 2018/2023 category files (reviews + meta), streamed line by line."""
    reviews_path, meta_path = locate(spec, data_dir)
    progress = bool(opts.get("progress", False))
    interactions = _read_reviews(reviews_path, progress)
    items = _read_meta(meta_path, set(interactions["item"].unique().tolist()), progress)
    return RawDataset(
        name=f"amazon:{_stem(spec)}",
        interactions=interactions,
        items=items,
        source=f"{reviews_path} + {meta_path}",
    )
