"""The command line: verbs work end to end; bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest

from benchmark.cli import main


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCHMARK_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_list_shows_methods_datasets_and_protocols(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("random", "pop", "sasrec", "ml-100k", "ml-1m", "synthetic", "loo", "temporal", "sampled"):
        assert word in out


def test_run_then_runs_then_compare(runs, capsys):
    assert main(["run", "--methods", "random,pop", "--dataset", "synthetic", "--quiet", "--run-id", "r1"]) == 0
    out = capsys.readouterr().out
    assert "NDCG@10" in out and "pop" in out
    assert main(["runs"]) == 0
    assert "r1" in capsys.readouterr().out
    assert main(["compare", "r1/pop", "r1/random", "--permutations", "500"]) == 0
    assert "ndcg@10" in capsys.readouterr().out.lower()


def test_data_prepare_prints_stats(runs, capsys):
    assert main(["data", "prepare", "--dataset", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "fingerprint=" in out and "users" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--methods", "nosuch", "--dataset", "synthetic"], "unknown method 'nosuch'"),
        (["run", "--methods", "pop", "--dataset", "nosuch"], "unknown dataset"),
        (["run", "--methods", "pop", "--dataset", "csv:missing.csv"], "missing.csv"),
        (["run", "--methods", "pop", "--dataset", "synthetic", "--kcore", "10000"], "k-core"),
        (["run", "--methods", "pop", "--dataset", "synthetic", "--set", "pop.nope=1"], "unknown hyperparameter"),
        (["run", "--methods", "pop", "--dataset", "synthetic", "--seeds", "a,b"], "--seeds"),
        (["run", "--methods", "pop", "--dataset", "synthetic", "--candidates", "top:5"], "candidate protocol"),
        (["compare", "nope/pop", "nope/random"], "no finished results"),
        (["leaderboard", "--dataset", "synthetic"], "no finished runs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runs, capsys, argv, needle):
    assert main(argv) == 2
    assert needle in one_error_line(capsys)


def test_malformed_csv_names_file_and_line(runs, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("user,item,timestamp\n1,10,100\n1,11,not-a-time\n")
    assert main(["data", "prepare", "--dataset", f"csv:{path}"]) == 2
    line = one_error_line(capsys)
    assert "bad.csv" in line and "line 3" in line


def test_failed_run_leaves_earlier_results_intact(runs, capsys):
    assert main(["run", "--methods", "pop", "--dataset", "synthetic", "--quiet", "--run-id", "r1"]) == 0
    before = (runs / "r1" / "pop" / "seed-0" / "per_user.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["run", "--methods", "pop", "--dataset", "synthetic", "--run-id", "r1", "--set", "pop.x=1"]) == 2
    assert (runs / "r1" / "pop" / "seed-0" / "per_user.jsonl").read_bytes() == before
    meta = json.loads((runs / "r1" / "run.json").read_text())
    assert meta["status"] == "finished"
