"""`csv:<path>`: interactions from a CSV file with a header row.

Required columns: user, item, timestamp (an integer). Optional: title, rating, year,
genres (pipe-joined). Without a title column the item id stands in as the title, so LLM
methods still get some text. A relative path is looked up as given, then under --data-dir.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.errors import DataError
from benchmark.types import RawDataset

REQUIRED = ("user", "item", "timestamp")
OPTIONAL = ("title", "rating", "year", "genres")
_ALIASES = {"user_id": "user", "item_id": "item", "time": "timestamp"}
OTHER_DELIMITERS = {";": "';' (semicolons)", "\t": "tabs", "|": "'|' (pipes)"}
# what spreadsheets and pandas write for a missing value: never a real user or item id
MISSING_WORDS = frozenset({"nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})
INT64 = (-(2**63), 2**63 - 1)


def locate(spec: str, data_dir: Path | None) -> Path:
    _, _, text = spec.partition(":")
    text = text.strip()
    if not text:
        raise DataError("csv needs a path: write csv:<path/to/file.csv>")
    path = Path(text).expanduser()
    tried = [path]
    if not path.is_file() and data_dir is not None and not path.is_absolute():
        tried.append(Path(data_dir) / path)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    folder = next((c for c in tried if c.is_dir()), None)
    if folder is not None:
        raise DataError(f"csv:{text} is a directory, not a CSV file; give the file, e.g. csv:{folder / 'ratings.csv'}")
    raise DataError(f"CSV file not found: {' or '.join(str(p) for p in tried)}; check the path after csv:")


def source_files(spec: str, data_dir: Path | None) -> list[Path]:
    return [locate(spec, data_dir)]


def _header(row: list[str], path: Path) -> list[str]:
    names = [_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in row]
    missing = [c for c in REQUIRED if c not in names]
    if missing and len(row) == 1:
        sep = next((d for d in OTHER_DELIMITERS if d in row[0]), None)
        if sep is not None:
            raise DataError(
                f"{path} line 1: the columns are separated by {OTHER_DELIMITERS[sep]}, not commas; "
                f"save the file comma-separated (user,item,timestamp,...)"
            )
    if missing:
        raise DataError(
            f"{path} line 1: header lacks {', '.join(missing)}; "
            f"the first row must name the columns user,item,timestamp[,title,rating,year,genres]"
        )
    return names


def load_csv(spec: str, data_dir: Path | None = None, **opts) -> RawDataset:
    """A CSV file with a header: user, item, timestamp[, title, rating, year, genres]."""
    path = locate(spec, data_dir)
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    item_text: dict[str, tuple[str, int | None, str]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            first = next(reader, None)
            if first is None:
                raise DataError(f"{path} is empty; it needs a header row user,item,timestamp")
            names = _header(first, path)
            col = {name: i for i, name in enumerate(names)}
            width = len(names)
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != width:
                    raise DataError(f"{path} line {line}: expected {width} columns, got {len(row)}")
                stamp = row[col["timestamp"]].strip()
                try:
                    times.append(int(stamp))
                except ValueError:
                    raise DataError(f"{path} line {line}: timestamp {stamp!r} is not an integer") from None
                if not INT64[0] <= times[-1] <= INT64[1]:
                    raise DataError(
                        f"{path} line {line}: timestamp {stamp} does not fit a 64-bit integer; "
                        "give Unix seconds (or any integer below 2**63)"
                    )
                user, item = row[col["user"]].strip(), row[col["item"]].strip()
                if not user or not item:
                    raise DataError(f"{path} line {line}: empty user or item")
                for what, value in (("user", user), ("item", item)):
                    if value.lower() in MISSING_WORDS:
                        raise DataError(
                            f"{path} line {line}: {what} id {value!r} is a missing-value marker; "
                            f"fill in the {what} or delete the row"
                        )
                users.append(user)
                items.append(item)
                if "rating" in col:
                    value = row[col["rating"]].strip()
                    try:
                        ratings.append(float(value) if value else np.nan)
                    except ValueError:
                        raise DataError(f"{path} line {line}: rating {value!r} is not a number") from None
                if item not in item_text or not item_text[item][0]:
                    item_text[item] = _text(row, col, item, path, line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); re-save it as UTF-8") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    if not users:
        raise DataError(f"{path} has a header but no rows")
    frame = {
        "user": pd.Series(users, dtype=str),
        "item": pd.Series(items, dtype=str),
        "timestamp": np.asarray(times, dtype=np.int64),
    }
    if "rating" in col:
        frame["rating"] = np.asarray(ratings, dtype=float)
    keys = list(item_text)
    catalog = pd.DataFrame(
        {
            "item": pd.Series(keys, dtype=str),
            "title": pd.Series([item_text[k][0] for k in keys], dtype=str),
            "year": pd.array([item_text[k][1] for k in keys], dtype="Int64"),
            "genres": pd.Series([item_text[k][2] for k in keys], dtype=str),
        }
    )
    return RawDataset(name=f"csv:{path.stem}", interactions=pd.DataFrame(frame), items=catalog, source=str(path))


def _text(row: list[str], col: dict[str, int], item: str, path: Path, line: int) -> tuple[str, int | None, str]:
    title = row[col["title"]].strip() if "title" in col else item
    year: int | None = None
    if "year" in col and row[col["year"]].strip():
        value = row[col["year"]].strip()
        try:
            year = int(float(value))
        except ValueError:
            raise DataError(f"{path} line {line}: year {value!r} is not a number") from None
    genres = row[col["genres"]].strip() if "genres" in col else ""
    return title, year, genres
