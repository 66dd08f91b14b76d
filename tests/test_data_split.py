"""Splits: leave-one-out and temporal invariants, fingerprint, disk cache, stats."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.data import prepare_split, preprocess_counts, split_stats, stats_frame
from benchmark.data.preprocess import preprocess
from benchmark.data.split import build_split, load_split, save_split
from benchmark.data.synthetic import SyntheticConfig, generate, tiny_split
from benchmark.errors import ConfigError


def test_loo_targets_histories_and_train():
    split = tiny_split(seed=1)
    prep = preprocess(generate(SyntheticConfig(**_cfg(split))), kcore=5)
    assert split.valid.users.tolist() == list(range(split.n_users))
    assert split.test.users.tolist() == list(range(split.n_users))
    for u in range(split.n_users):
        seq = prep.sequence(u)
        assert split.test.targets[u] == seq[-1]
        assert split.valid.targets[u] == seq[-2]
        assert split.train[u].tolist() == seq[:-2].tolist()
        assert split.valid.histories[u].tolist() == split.train[u].tolist()
        assert split.test.histories[u].tolist() == split.train[u].tolist() + [split.valid.targets[u]]
        # items are never repeated after preprocessing, so a target is never in its history
        assert split.test.targets[u] not in split.test.histories[u]
        assert split.valid.targets[u] not in split.valid.histories[u]


def _cfg(split) -> dict:
    parts = dict(p.split("=") for p in split.dataset.split(":", 1)[1].split(","))
    return {k: (float(v) if "." in v else int(v)) for k, v in parts.items()}


def test_temporal_split_has_no_leakage():
    split = tiny_split(seed=2, n_users=120, protocol="temporal")
    prep = preprocess(generate(SyntheticConfig(**_cfg(split))), kcore=5)
    t1, t2 = split.config["t_valid"], split.config["t_test"]
    assert t1 < t2
    assert len(split.valid) > 0 and len(split.test) > 0
    for u in range(split.n_users):
        seq, times = prep.sequence(u), prep.times(u)
        n_train = len(split.train[u])
        assert (times[:n_train] < t1).all()  # no training interaction at or after t1
        assert n_train == int((times < t1).sum())
    for part, lo, hi in ((split.valid, t1, t2), (split.test, t2, None)):
        for user, target, hist in zip(part.users, part.targets, part.histories):
            seq, times = prep.sequence(user), prep.times(user)
            pos = len(hist)
            assert pos > 0 and seq[pos] == target and hist.tolist() == seq[:pos].tolist()
            assert times[pos] >= lo and (hi is None or times[pos] < hi)
            assert pos == 0 or times[pos - 1] < lo  # it is the user's first one in the period
    # every test user with training data sees the whole past in the history
    assert all(len(h) >= len(split.train[u]) for u, h in zip(split.test.users, split.test.histories))


def test_cache_round_trip_is_identical(tmp_path):
    first = prepare_split("synthetic:seed=3,n_users=80,n_items=60", cache_dir=tmp_path)
    cached = list((tmp_path / "splits").iterdir())
    assert len(cached) == 1 and (cached[0] / "split.npz").is_file() and (cached[0] / "split.json").is_file()
    again = prepare_split("synthetic:seed=3,n_users=80,n_items=60", cache_dir=tmp_path)
    assert again.fingerprint == first.fingerprint
    assert again.user_ids == first.user_ids and again.catalog == first.catalog
    assert all(np.array_equal(a, b) for a, b in zip(again.train, first.train))
    for x, y in ((again.valid, first.valid), (again.test, first.test)):
        assert np.array_equal(x.users, y.users) and np.array_equal(x.targets, y.targets)
        assert all(np.array_equal(a, b) for a, b in zip(x.histories, y.histories))
    assert again.config == first.config
    assert not [p for p in (tmp_path / "splits").iterdir() if p.name.startswith(".")]  # no temp left


def test_save_and_load_temporal(tmp_path):
    split = tiny_split(seed=4, protocol="temporal", n_users=100)
    save_split(split, tmp_path / "s")
    back = load_split(tmp_path / "s")
    assert back.fingerprint == split.fingerprint and back.protocol == "temporal"
    assert back.config["t_valid"] == split.config["t_valid"]


def test_determinism_and_fingerprint_sensitivity():
    a, b = tiny_split(seed=5), tiny_split(seed=5)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert tiny_split(seed=6).fingerprint != a.fingerprint
    assert tiny_split(seed=5, protocol="temporal").fingerprint != a.fingerprint
    raw = generate(SyntheticConfig(seed=5, n_users=60, n_items=40, min_len=13, max_len=20))
    base = build_split(raw, kcore=5)
    raw.items.loc[0, "title"] = raw.items.loc[0, "title"] + " Returns"
    assert build_split(raw, kcore=5).fingerprint != base.fingerprint  # item text is content


def test_seed_parameter_reaches_synthetic(tmp_path):
    s0 = prepare_split("synthetic:n_users=50,n_items=40", seed=0, cache_dir=tmp_path)
    s1 = prepare_split("synthetic:n_users=50,n_items=40", seed=1, cache_dir=tmp_path)
    assert s0.fingerprint != s1.fingerprint
    assert s0.dataset.endswith("seed=0")


def test_unknown_protocol():
    with pytest.raises(ConfigError, match="loo, temporal"):
        build_split(generate(SyntheticConfig(n_users=20, n_items=20)), protocol="random")


def test_stats_rows():
    split = tiny_split(seed=7)
    rows = {r["part"]: r for r in split_stats(split)}
    assert list(rows) == ["all", "train", "valid", "test"]
    assert rows["all"]["interactions"] == rows["train"]["interactions"] + 2 * split.n_users
    assert rows["test"]["users"] == len(split.test)
    assert rows["test"]["mean_length"] == pytest.approx(rows["valid"]["mean_length"] + 1)
    assert 0 < rows["train"]["density"] <= 1
    frame = stats_frame(split)
    assert frame.loc["train", "users"] == split.n_users
    counts = preprocess_counts(split)
    assert counts["interactions kept"] == rows["all"]["interactions"]
    assert "exact duplicate rows dropped" in counts


def test_cache_is_rebuilt_when_the_source_file_changes(tmp_path):
    path = tmp_path / "log.csv"
    rows = [f"u{u},i{i},{u * 10 + i},Title {i}" for u in range(4) for i in range(5)]
    path.write_text("user,item,timestamp,title\n" + "\n".join(rows) + "\n")
    first = prepare_split(f"csv:{path}", kcore=2, cache_dir=tmp_path / "cache", progress=True)
    assert prepare_split(f"csv:{path}", kcore=2, cache_dir=tmp_path / "cache").fingerprint == first.fingerprint
    path.write_text("user,item,timestamp,title\n" + "\n".join(rows + ["u9,i0,1,Title 0"]) + "\n")
    changed = prepare_split(f"csv:{path}", kcore=2, cache_dir=tmp_path / "cache")
    assert changed.fingerprint != first.fingerprint
    assert len(list((tmp_path / "cache" / "splits").iterdir())) == 2
    assert first.config["preprocess"]["kcore_users_removed"] == 0
    assert changed.config["preprocess"]["kcore_users_removed"] == 1  # u9 has one interaction
