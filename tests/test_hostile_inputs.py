"""The battery of hostile inputs and faults (issue 18), on a store of small synthetic runs.

Every case: exit code 2, exactly one line on stderr (the error), no traceback, and every file
under the runs and leaderboards directories byte-identical before and after.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import benchmark.data.csv_loader as csv_loader
from benchmark.cli import main

SYN = ["--dataset", "synthetic", "--quiet"]
TOML_BYTES = b"\x7fELF\x02\x01\x01\x00\xd0\xff binary"


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    """r1: pop and random; r2: a one-epoch SASRec; a published leaderboard; two CSV files."""
    root = tmp_path_factory.mktemp("hostile")
    runs = root / "runs"
    assert main(["--runs-dir", str(runs), "run", "--methods", "pop,random", *SYN, "--run-id", "r1"]) == 0
    assert main(["--runs-dir", str(runs), "run", "--methods", "sasrec", "--set", "sasrec.epochs=1", *SYN,
                 "--run-id", "r2"]) == 0
    assert main(["--runs-dir", str(runs), "leaderboard", "--dataset", "synthetic", "--permutations", "200",
                 "--leaderboards", str(root / "leaderboards"), "--quiet"]) == 0
    return root


@pytest.fixture()
def store(base_store, tmp_path, monkeypatch, capsys):
    """A private copy of the base store, as the working directory; BENCHMARK_RUNS points at it."""
    root = tmp_path / "w"
    shutil.copytree(base_store, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("BENCHMARK_RUNS", str(root / "runs"))
    capsys.readouterr()
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under runs/ and leaderboards/: a file's sha256, a directory's mark."""
    out = {}
    for top in ("runs", "leaderboards"):
        for path in sorted((root / top).rglob("*")):
            out[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hostile(root: Path, capsys, argv: list[str]) -> str:
    """Run argv; assert exit 2, one error line, no traceback, an untouched store; return the line."""
    before = snapshot(root)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert snapshot(root) == before
    return lines[0]


def write_csv(path: Path, rows: list[tuple], header: str = "user,item,timestamp", sep: str = ",") -> Path:
    path.write_text("\n".join([header.replace(",", sep)] + [sep.join(str(v) for v in r) for r in rows]) + "\n")
    return path


def csv_rows(n_users: int = 20, per_user: int = 6, same_time: bool = False) -> list[tuple]:
    rng = np.random.default_rng(0)
    return [(u, int(rng.integers(0, 30)), 100 if same_time else u * 100 + j) for u in range(n_users)
            for j in range(per_user)]


# ----------------------------------------------------------------------------- argument cases

ARG_CASES = [
    # run ids: no escape from the runs directory, no writing into a run of another dataset/protocol
    (["run", "--methods", "pop", *SYN, "--run-id", "../outside"], "a run id is one name inside"),
    (["run", "--methods", "pop", *SYN, "--run-id", "/tmp/abs"], "a run id is one name inside"),
    (["run", "--methods", "pop", "--dataset", "synthetic:seed=1", "--quiet", "--run-id", "r1"], "another dataset"),
    (["run", "--methods", "pop", *SYN, "--candidates", "sampled:10", "--run-id", "r1"], "another candidates"),
    (["run", "--methods", "pop", *SYN, "--split", "temporal", "--run-id", "r1"], "another split"),
    (["run", "--methods", "pop", *SYN, "--eval-users", "50", "--run-id", "r1"], "another protocol"),
    # one label, one configuration: seed 0 keeps epochs=1, so seed 1 with epochs=2 would mix them
    (["run", "--methods", "sasrec", "--set", "sasrec.epochs=2", "--seeds", "1", *SYN, "--run-id", "r2"],
     "holds sasrec/seed-0 with other settings (epochs: 1 -> 2)"),
    # labels that are not in the run
    (["run", "--methods", "pop", *SYN, "--set", "sasrc.epochs=1"], "--set sasrc.epochs names 'sasrc', which is not"),
    (["run", "--methods", "pop", *SYN, "--set", "sasrec.epochs=1"], "this run has: pop"),
    (["run", "--methods", "pop,pop", *SYN], "names 'pop' more than once"),
    # hyperparameter ranges, declared with hp()
    (["run", "--methods", "sasrec", *SYN, "--set", "sasrec.epochs=0"], "sasrec.epochs=0: must be >= 1"),
    (["run", "--methods", "sasrec", *SYN, "--set", "sasrec.epochs=-1"], "sasrec.epochs=-1: must be >= 1"),
    (["run", "--methods", "sasrec", *SYN, "--set", "sasrec.patience=-1"], "sasrec.patience=-1: must be >= 1"),
    (["run", "--methods", "sasrec", *SYN, "--set", "sasrec.lr=-1"], "sasrec.lr=-1.0: must be > 0"),
    (["run", "--methods", "sasrec", *SYN, "--set", "sasrec.lr=nan"], "sasrec.lr=nan: must be a finite number"),
    (["run", "--methods", "sasrec_v1", *SYN, "--set", "sasrec_v1.dropout=1.5"], "must be >= 0 and < 1"),
    (["run", "--methods", "sasrec", *SYN, "--set", "sasrec.device=tpu"], "sasrec.device=tpu: unknown device"),
    # run options
    (["run", "--methods", "pop", *SYN, "--device", "tpu"], "--device=tpu: unknown device"),
    (["run", "--methods", "sasrec", *SYN, "--device", "tpu"], "--device=tpu: unknown device"),
    (["run", "--methods", "pop", *SYN, "--candidates", "sampled:100000"], "unseen items to sample from"),
    (["run", "--methods", "pop", *SYN, "--k", "-5"], "--k -5: ranked lists must hold at least 20 items"),
    (["run", "--methods", "pop", *SYN, "--k", "0"], "--k 0: ranked lists must hold at least 20 items"),
    (["run", "--methods", "pop", *SYN, "--k", "5000"], "longer than the catalog (200 items)"),
    (["run", "--methods", "pop", *SYN, "--seeds", str(2**70)], "out of range"),
    (["run", "--methods", "pop", *SYN, "--seeds", "-1"], "out of range"),
    (["run", "--methods", "pop", *SYN, "--seeds", "0,0"], "repeats a seed"),
    (["run", "--methods", "pop", *SYN, "--eval-users", "0"], "--eval-users 0: give a positive number"),
    (["run", "--methods", "pop", *SYN, "--eval-users", "-3"], "--eval-users -3"),
    (["run", "--methods", "pop", *SYN, "--kcore", "-1"], "--kcore must be >= 0"),
    # leaderboard and compare
    (["leaderboard", "--dataset", "synthetic", "--metrics", ""], "--metrics '' names no metric"),
    (["leaderboard", "--dataset", "synthetic", "--metrics", " , "], "names no metric"),
    (["leaderboard", "--dataset", "synthetic", "--permutations", "0"], "--permutations 0: give a positive"),
    (["compare", "r1/pop", "r1/random", "--permutations", "0"], "--permutations 0: give a positive"),
    (["compare", "r1/pop", "r1/random", "--permutations", "-5"], "--permutations -5: give a positive"),
    (["compare", "r1/pop", "r1/random", "--metrics", ""], "names no metric"),
    (["compare", "../r1/pop", "r1/random"], "bad reference"),
]


@pytest.mark.parametrize("argv, needle", ARG_CASES, ids=[" ".join(a)[:60] for a, _ in ARG_CASES])
def test_bad_arguments(store, capsys, argv, needle):
    assert needle in hostile(store, capsys, argv)


# ----------------------------------------------------------------------------- files given to the CLI


def test_config_file_that_is_binary_a_directory_or_names_a_missing_label(store, capsys):
    binary = store / "weights.bin"
    binary.write_bytes(TOML_BYTES)
    assert "not UTF-8 text" in hostile(store, capsys, ["run", "--methods", "pop", *SYN, "--config", str(binary)])
    line = hostile(store, capsys, ["run", "--methods", "pop", *SYN, "--config", str(store)])
    assert "is a directory" in line
    typo = store / "typo.toml"
    typo.write_text("[sasrc]\nepochs = 1\n")
    line = hostile(store, capsys, ["run", "--methods", "sasrec", *SYN, "--config", str(typo)])
    assert "[sasrc] in" in line and "typo.toml" in line and "this run has: sasrec" in line


@pytest.mark.parametrize(
    "name, make, needle",
    [
        ("dir", lambda d: d, "is a directory, not a CSV file"),
        ("semi", lambda d: write_csv(d / "s.csv", csv_rows(), sep=";"), "separated by ';' (semicolons)"),
        ("nan", lambda d: write_csv(d / "n.csv", csv_rows() + [("NaN", 3, 5)]), "user id 'NaN' is a missing-value"),
        ("big", lambda d: write_csv(d / "b.csv", [(1, 2, 2**64)]), "does not fit a 64-bit integer"),
        ("temporal", lambda d: write_csv(d / "t.csv", csv_rows(same_time=True)), "use --split loo"),
    ],
)
def test_bad_csv_files(store, capsys, name, make, needle):
    folder = store / "data"
    folder.mkdir()
    path = make(folder)
    argv = ["data", "prepare", "--dataset", f"csv:{path}", "--kcore", "1"]
    if name == "temporal":
        argv += ["--split", "temporal"]
    assert needle in hostile(store, capsys, argv)


def test_unreadable_csv_names_path_errno_and_fix(store, capsys, monkeypatch):
    path = write_csv(store / "ok.csv", csv_rows())

    def denied(file, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

    monkeypatch.setattr(csv_loader, "open", denied, raising=False)
    line = hostile(store, capsys, ["data", "prepare", "--dataset", f"csv:{path}", "--kcore", "1"])
    assert str(path) in line and "(EACCES)" in line and "permissions" in line


# ----------------------------------------------------------------------------- a damaged store


@pytest.mark.parametrize(
    "victim, argv",
    [
        ("r1/pop/seed-0/metrics.json", ["leaderboard", "--dataset", "synthetic", "--quiet"]),
        ("r1/pop/seed-0/metrics.json", ["compare", "r1/pop", "r1/random"]),
        ("r1/pop/seed-0/config.json", ["leaderboard", "--dataset", "synthetic", "--quiet"]),
        ("r1/pop/seed-0/config.json", ["run", "--methods", "random", *SYN, "--candidates", "retrieved:pop:20"]),
        ("r1/run.json", ["run", "--methods", "pop", *SYN, "--run-id", "r1"]),
    ],
)
def test_truncated_json_in_the_store(store, capsys, victim, argv):
    path = store / "runs" / victim
    path.write_bytes(path.read_bytes()[:25])
    line = hostile(store, capsys, argv)
    assert victim.split("/")[-1] in line and "is damaged" in line


def test_deleted_run_json_is_named_not_reported_as_no_runs(store, capsys):
    (store / "runs" / "r1" / "run.json").unlink()
    line = hostile(store, capsys, ["leaderboard", "--dataset", "synthetic", "--quiet"])
    assert "run.json is missing" in line and "--run-id r1" in line
    assert main(["runs"]) == 0
    assert "run.json missing" in capsys.readouterr().out


# ----------------------------------------------------------------------------- OS faults


def fail_writes(monkeypatch, root: Path, code: int) -> None:
    """Every attempt to create or write a file or directory under `root` raises OSError(code)."""
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    root_text = str(root.resolve())

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root_text)

    def fault(path):
        return OSError(code, os.strerror(code), os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and inside(file) and any(c in mode for c in "wax+"):
            raise fault(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise fault(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            raise fault(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.mark.parametrize("code, advice", [(errno.EROFS, "writable directory"), (errno.ENOSPC, "free some disk space"),
                                          (errno.EACCES, "permissions")])
@pytest.mark.parametrize(
    "where, argv",
    [
        ("runs", ["run", "--methods", "pop", *SYN]),  # a new run
        ("runs", ["run", "--methods", "pop", *SYN, "--run-id", "r1", "--force"]),  # into an existing one
        ("leaderboards", ["leaderboard", "--dataset", "synthetic", "--permutations", "100", "--quiet"]),
    ],
)
def test_unwritable_store_or_leaderboards(store, capsys, monkeypatch, code, advice, where, argv):
    fail_writes(monkeypatch, store / where, code)
    line = hostile(store, capsys, argv)
    assert f"{where}/" in line and f"({errno.errorcode[code]})" in line and advice in line


# ----------------------------------------------------------------------------- faults mid-run, and what now gives a correct result


def unit_files(root: Path, run_id: str) -> dict[str, str]:
    return {k: v for k, v in snapshot(root).items() if k.startswith(f"runs/{run_id}/") and not k.endswith("run.json")}


def test_full_disk_mid_run_marks_the_run_failed_and_loses_nothing(store, capsys, monkeypatch):
    import benchmark.store as store_mod

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) raises it: no file name

    before = unit_files(store, "r1")
    monkeypatch.setattr(store_mod, "open", lambda *a, **k: FullDisk(), raising=False)
    argv = ["run", "--methods", "pop,sasrec", "--set", "sasrec.epochs=2", *SYN, "--run-id", "r1"]  # not in r2: fitted
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs/r1/sasrec/" in err[0] and "(ENOSPC)" in err[0] and "rerun the same command" in err[0]
    assert unit_files(store, "r1") == before  # pop and random untouched, no half-written sasrec unit
    assert not any(p.name.startswith(".") for p in (store / "runs" / "r1").rglob("*"))
    meta = main_json(store / "runs" / "r1" / "run.json")
    assert meta["status"] == "failed" and "No space left on device" in meta["error"]
    monkeypatch.undo()
    monkeypatch.setenv("BENCHMARK_RUNS", str(store / "runs"))
    assert main(argv) == 0  # the same command resumes
    assert main_json(store / "runs" / "r1" / "run.json")["status"] == "finished"


def main_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_eval_users_beyond_the_test_users_evaluates_all_under_the_full_label(store, capsys):
    assert main(["run", "--methods", "pop", *SYN, "--eval-users", "100000", "--run-id", "all"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().startswith("note: --eval-users 100000 covers all 300 test users")
    config = main_json(store / "runs" / "all" / "pop" / "seed-0" / "config.json")
    assert (config["protocol"], config["eval_users"]) == ("loo-full", None)
    assert "reused" in out  # the very unit of r1: the same protocol, not a "u100000" one


def test_a_retrained_retriever_gives_new_candidates(store, capsys):
    def candidates_of(run_id: str) -> dict[int, list[int]]:
        rows = (store / "runs" / run_id / "pop" / "seed-0" / "rankings.jsonl").read_text().splitlines()
        return {r["uid"]: r["items"] for r in map(__import__("json").loads, rows)}

    def top20(run_id: str) -> dict[int, set[int]]:
        rows = (store / "runs" / run_id / "sasrec" / "seed-0" / "rankings.jsonl").read_text().splitlines()
        return {r["uid"]: set(r["items"][:20]) for r in map(__import__("json").loads, rows)}

    rerank = ["run", "--methods", "pop", *SYN, "--candidates", "retrieved:sasrec:20", "--run-id"]
    assert main(rerank + ["first"]) == 0
    assert main(["run", "--methods", "sasrec", "--set", "sasrec.epochs=3", *SYN, "--run-id", "r3"]) == 0
    assert main(rerank + ["second"]) == 0
    first, second = candidates_of("first"), candidates_of("second")
    assert first != second
    assert all(set(items) <= top20("r2")[u] for u, items in first.items())
    assert all(set(items) <= top20("r3")[u] for u, items in second.items())


def test_split_cache_follows_the_file_content_not_its_size_and_mtime(store, capsys):
    path = write_csv(store / "edit.csv", csv_rows())
    stamp = path.stat().st_mtime_ns
    argv = ["data", "prepare", "--dataset", f"csv:{path}", "--kcore", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out.split("fingerprint=")[1].split()[0]
    text = path.read_text()
    path.write_text(text.replace("\n3,", "\n4,", 1))  # one user id changed: same size
    os.utime(path, ns=(stamp, stamp))
    assert path.stat().st_size == len(text) and path.stat().st_mtime_ns == stamp
    assert main(argv) == 0
    assert capsys.readouterr().out.split("fingerprint=")[1].split()[0] != first


def test_data_prepare_shows_the_dropped_rows(store, capsys):
    rows = csv_rows()
    path = write_csv(store / "dups.csv", rows + rows[:3] + [(0, rows[5][1], 999)])
    assert main(["data", "prepare", "--dataset", f"csv:{path}", "--kcore", "1"]) == 0
    out = capsys.readouterr().out
    assert "exact duplicate rows dropped" in out and "repeated (user, item) pairs dropped" in out
    counts = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in out.splitlines()
              if "dropped" in line}
    assert counts["exact duplicate rows dropped"] == "3"


def test_a_rerun_into_a_run_merges_methods_and_overrides_per_label(store, capsys):
    assert main(["run", "--methods", "sasrec", "--set", "sasrec.epochs=1", *SYN, "--run-id", "r1"]) == 0
    meta = main_json(store / "runs" / "r1" / "run.json")
    assert meta["methods"] == ["pop", "random", "sasrec"] and meta["overrides"] == {"sasrec": {"epochs": "1"}}
    assert set(meta["stages"]) == {"pop/seed-0", "random/seed-0", "sasrec/seed-0"}
    assert main(["run", "--methods", "pop", *SYN, "--run-id", "r1"]) == 0  # sasrec's overrides stay: its unit does
    assert main_json(store / "runs" / "r1" / "run.json")["overrides"] == {"sasrec": {"epochs": "1"}}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_directories_follow_the_umask(store, capsys, mask):
    old = os.umask(mask)
    try:
        assert main(["run", "--methods", "pop", *SYN, "--run-id", "m", "--force", "--publish",
                     "--leaderboards", "lb"]) == 0
    finally:
        os.umask(old)
    made = [store / "runs" / "m", store / "lb"]
    for top in made:
        for path in [top, *top.rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert path.stat().st_mode & 0o777 == want, path


def test_overrides_may_name_a_first_stage_the_run_uses():
    from benchmark.runner import resolve_method
    from benchmark.validate import check_labels, run_labels

    labels = run_labels([resolve_method("llamarec", {})])
    assert labels == ["llamarec", "sasrec"]  # llamarec.retriever=sasrec: `--set sasrec.epochs=1` shapes it
    check_labels({"sasrec": {"epochs": "1"}}, labels, "--set")
