"""Published evidence end to end through the CLI: a new user's path on a clean clone, merge rules,
fingerprint refusals, `verify`, and the integrity checks on everything a leaderboard reads."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.errors import PublishConflict
from benchmark.evidence import read_evidence
from benchmark.merge import check_fingerprints

STEM = "synthetic-loo-full"
REPO = Path(__file__).resolve().parents[1]
BASE = ["--dataset", "synthetic", "--quiet"]


def cli(capsys, runs: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--runs-dir", str(runs), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("run ", "note: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A repository whose leaderboards/ holds pop and random on the synthetic dataset, with evidence."""
    root = tmp_path_factory.mktemp("origin")
    assert main(["--runs-dir", str(root / "runs"), "run", "--methods", "pop,random", *BASE, "--publish",
                 "--leaderboards", str(root / "leaderboards")]) == 0
    return root


@pytest.fixture()
def board(published, tmp_path) -> Path:
    """A private copy of the published leaderboards/ folder."""
    return Path(shutil.copytree(published / "leaderboards", tmp_path / "leaderboards"))


def rows_of(board: Path) -> dict[str, dict]:
    return {r["label"]: r for r in json.loads((board / f"{STEM}.json").read_text())["rows"]}


def test_evidence_holds_every_row_compressed_with_config_metrics_manifest_and_fingerprints(published):
    folder = published / "leaderboards" / STEM
    evidence = read_evidence(folder)
    index = evidence.index
    assert [(e["label"], e["seed"]) for e in index["units"]] == [("pop", 0), ("random", 0)]
    assert index["split_fingerprint"] and index["candidate_fingerprint"] and index["n_users"] == 300
    for entry in index["units"]:
        unit_dir = folder / entry["path"]
        assert sorted(p.name for p in unit_dir.iterdir()) == [
            "config.json", "metrics.json", "per_user.jsonl.gz", "rankings.jsonl.gz"]
        run_store_unit = published / "runs" / entry["run_id"] / entry["label"] / "seed-0"
        per_user = gzip.decompress((unit_dir / "per_user.jsonl.gz").read_bytes())
        assert per_user == (run_store_unit / "per_user.jsonl").read_bytes()  # the run store's file, compressed
        rankings = [json.loads(line) for line in gzip.decompress((unit_dir / "rankings.jsonl.gz").read_bytes()).splitlines()]
        stored = [json.loads(line) for line in (run_store_unit / "rankings.jsonl").read_text().splitlines()]
        assert rankings == [{k: v for k, v in row.items() if k != "scores"} for row in stored]  # ids, no scores
        assert len(rankings) == 300 and set(rankings[0]) == {"user", "uid", "target", "items"}
        for name in ("config.json", "metrics.json"):  # copied whole
            assert (unit_dir / name).read_bytes() == (run_store_unit / name).read_bytes()
        run = json.loads((folder / "runs" / f"{entry['run_id']}.json").read_text())
        assert run["manifest"]["versions"]["torch"] and run["n_test_users"] == 300
    md = (published / "leaderboards" / f"{STEM}.md").read_text()
    assert f"[{STEM}/]({STEM}/)" in md and f"fingerprint {index['candidate_fingerprint']}" in md
    assert (published / "leaderboards" / f"{STEM}-cost.png").read_bytes()[:4] == b"\x89PNG"


def test_new_user_on_a_clean_clone_gets_every_committed_row_plus_theirs(published, tmp_path, capsys):
    """`run --methods <new method> --publish` on a clone holding only the committed files, as CI sees them."""
    origin = tmp_path / "origin"
    shutil.copytree(published / "leaderboards", origin / "leaderboards")
    # the repository's own .gitignore decides what a commit holds: a bare `runs/` there once kept every
    # evidence folder's runs/<id>.json out of git while this test, committing without it, still passed
    shutil.copy(REPO / ".gitignore", origin / ".gitignore")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(origin)], check=True)
    subprocess.run([*git, "-C", str(origin), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(origin), "commit", "-qm", "published"], check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert not (clone / "runs").exists()
    assert snapshot(clone / "leaderboards") == snapshot(origin / "leaderboards")  # nothing published was ignored

    code, out, err = cli(capsys, clone / "runs", "run", "--methods", "examples.markov_plugin:Markov", *BASE,
                         "--publish", "--leaderboards", str(clone / "leaderboards"))
    assert code == 0, err
    assert "kept 2 published row(s) not in the run store: pop, random" in err
    rows = rows_of(clone / "leaderboards")
    assert set(rows) == {"markov", "pop", "random"}
    board = json.loads((clone / "leaderboards" / f"{STEM}.json").read_text())
    for metric in board["metrics"]:
        against = {(p["a"], p["b"]) for p in board["pairs"][metric] if "markov" in (p["a"], p["b"])}
        assert against == {("markov", "pop"), ("markov", "random")}  # markov ranks first
        for p in board["pairs"][metric]:
            assert 0 < p["p_randomization"] <= 1 and 0 <= p["p_t"] <= 1 and p["mde"] > 0
    committed = rows_of(published / "leaderboards")
    for label in ("pop", "random"):  # the committed rows, unchanged
        assert rows[label]["metrics"]["ndcg@10"]["mean"] == committed[label]["metrics"]["ndcg@10"]["mean"]
        assert rows[label]["run_ids"] == committed[label]["run_ids"]
    units = [(e["label"], e["seed"]) for e in read_evidence(clone / "leaderboards" / STEM).index["units"]]
    assert units == [("markov", 0), ("pop", 0), ("random", 0)]
    code, out, err = cli(capsys, clone / "runs", "verify", "--leaderboards", str(clone / "leaderboards"), "--check-split")
    assert code == 0, err
    assert "verified 1 leaderboard(s)" in out and "300 test users and their targets match" in out


def test_republishing_unchanged_results_leaves_every_byte_alone(published, board, tmp_path, capsys):
    before = snapshot(board)
    for runs in (published / "runs", tmp_path / "empty-runs"):  # the publisher's store, and a clone's (none)
        code, _, err = cli(capsys, runs, "leaderboard", "--dataset", "synthetic", "--leaderboards", str(board), "--quiet")
        assert code == 0, err
        assert snapshot(board) == before


def test_a_different_split_fingerprint_is_refused_with_nothing_written(board, tmp_path, capsys):
    before = snapshot(board)
    code, _, err = cli(capsys, tmp_path / "runs", "run", "--methods", "random", *BASE, "--kcore", "3", "--publish",
                       "--leaderboards", str(board))
    line = one_error_line(err)
    published_fp = read_evidence(board / STEM).index["split_fingerprint"]
    assert code == 2 and "split fingerprint" in line and published_fp in line
    local_fp = line.split("split fingerprint ")[1].split()[0]
    assert local_fp != published_fp and len(local_fp) == len(published_fp)
    assert snapshot(board) == before
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/run.json"))  # refused before training


def test_a_different_candidate_fingerprint_is_refused_naming_both(published, board, tmp_path, capsys):
    assert cli(capsys, tmp_path / "runs", "run", "--methods", "random", *BASE)[0] == 0
    from benchmark.evidence import local_unit
    from benchmark.store import RunStore

    store = RunStore(tmp_path / "runs")
    local = [local_unit(store, u) for u in store.finished_units()]
    evidence = read_evidence(board / STEM)
    evidence.index["candidate_fingerprint"] = "0123456789abcdef"  # as if published on another candidate set
    with pytest.raises(PublishConflict) as info:
        check_fingerprints(local, evidence, store.cache_dir)
    message = str(info.value)
    assert "0123456789abcdef" in message and read_evidence(board / STEM).index["candidate_fingerprint"] in message
    assert "\n" not in message


def test_a_local_row_replaces_a_published_one_only_on_request(board, tmp_path, capsys):
    before = snapshot(board)
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, runs, "run", "--methods", "pop", *BASE, "--seeds", "1", "--publish",
                       "--leaderboards", str(board))
    line = one_error_line(err)
    assert code == 2 and "local row 'pop'" in line and "--replace pop" in line
    assert snapshot(board) == before
    code, _, err = cli(capsys, runs, "leaderboard", "--dataset", "synthetic", "--leaderboards", str(board),
                       "--replace", "pop", "--quiet")
    assert code == 0, err
    assert "replaced published row(s) by local ones: pop" in err
    rows = rows_of(board)
    assert rows["pop"]["seeds"] == [1] and rows["random"]["seeds"] == [0]  # random stays
    assert [p.name for p in (board / STEM / "units" / "pop").iterdir()] == ["seed-1"]  # no stale files
    code, _, err = cli(capsys, runs, "leaderboard", "--dataset", "synthetic", "--leaderboards", str(board),
                       "--replace", "nosuch")
    assert code == 2 and "--replace nosuch: no such row" in one_error_line(err)


def test_an_identical_reproduction_of_a_published_row_is_not_a_conflict(board, tmp_path, capsys):
    before = snapshot(board)
    code, _, err = cli(capsys, tmp_path / "runs", "run", "--methods", "pop", *BASE, "--publish",
                       "--leaderboards", str(board))
    assert code == 0, err
    assert snapshot(board) == before  # pop is deterministic: the published unit stands, byte for byte


def _edit_gz(path: Path, edit) -> None:
    rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    rows = edit(rows)
    path.write_bytes(gzip.compress("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode(), mtime=0))


def test_verify_catches_a_hand_edited_per_user_value(board, tmp_path, capsys):
    code, out, err = cli(capsys, tmp_path / "runs", "verify", "--dataset", "synthetic", "--protocol", "loo-full",
                         "--leaderboards", str(board))
    assert code == 0 and "ok  pop seed 0: 300 users, 16 per-user metrics recomputed" in out

    def lift(rows):
        row = next(r for r in rows if r["ndcg@10"] == 0.0)
        row["ndcg@10"] = 0.5
        return rows

    _edit_gz(board / STEM / "units" / "random" / "seed-0" / "per_user.jsonl.gz", lift)
    code, _, err = cli(capsys, tmp_path / "runs", "verify", str(board / STEM))
    line = one_error_line(err)
    assert code == 2 and "random seed 0" in line and "ndcg@10 = 0.5" in line and "give 0.0" in line
    assert "user '" in line


@pytest.mark.parametrize("where", ["local", "published"])
def test_a_per_user_value_out_of_range_is_refused(published, board, tmp_path, capsys, where):
    runs = tmp_path / "runs"
    shutil.copytree(published / "runs", runs)
    before = snapshot(board)

    def seven_and_a_half(rows):
        rows[3]["ndcg@10"] = 7.5
        return rows

    if where == "local":
        path = next(runs.glob("*/pop/seed-0/per_user.jsonl"))
        rows = seven_and_a_half([json.loads(line) for line in path.read_text().splitlines()])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        shutil.rmtree(runs)
        _edit_gz(board / STEM / "units" / "pop" / "seed-0" / "per_user.jsonl.gz", seven_and_a_half)
        before = snapshot(board)
    code, _, err = cli(capsys, runs, "leaderboard", "--dataset", "synthetic", "--leaderboards", str(board))
    line = one_error_line(err)
    assert code == 2 and "ndcg@10 = 7.5, outside [0, 1]" in line and "pop seed 0" in line
    assert snapshot(board) == before


@pytest.mark.parametrize("where", ["local", "published"])
def test_deleting_users_from_every_unit_is_refused(published, board, tmp_path, capsys, where):
    runs = tmp_path / "runs"
    if where == "local":
        shutil.copytree(published / "runs", runs)
        for path in runs.glob("*/*/seed-0/per_user.jsonl"):
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(lines[30:]))
        shutil.rmtree(board)  # no published evidence either: only the run store speaks
    else:
        for path in (board / STEM / "units").glob("*/seed-0/*.jsonl.gz"):
            _edit_gz(path, lambda rows: rows[30:])
    before = snapshot(board) if board.exists() else None
    code, _, err = cli(capsys, runs, "leaderboard", "--dataset", "synthetic", "--leaderboards", str(board))
    line = one_error_line(err)
    assert code == 2 and "holds 270 users but its run evaluated 300" in line
    assert (snapshot(board) if board.exists() else None) == before
    if where == "published":  # the same files fail verify too
        code, _, err = cli(capsys, runs, "verify", "--leaderboards", str(board))
        assert code == 2 and "holds 270 users" in one_error_line(err)


def test_verify_checks_the_leaderboard_json_against_the_per_user_values(board, tmp_path, capsys):
    path = board / f"{STEM}.json"
    data = json.loads(path.read_text())
    data["rows"][0]["metrics"]["ndcg@10"]["mean"] += 0.05
    path.write_text(json.dumps(data))
    code, _, err = cli(capsys, tmp_path / "runs", "verify", str(path))
    line = one_error_line(err)
    assert code == 2 and f"row {data['rows'][0]['label']!r} shows ndcg@10 mean" in line


def test_an_eval_users_subsample_and_sampled_candidates_are_published_and_merged(tmp_path, capsys):
    from benchmark.data.split import prepare_split
    from benchmark.runner import subsample_users

    board = tmp_path / "lb"
    args = ["--dataset", "synthetic", "--quiet", "--eval-users", "40", "--candidates", "sampled:15",
            "--publish", "--leaderboards", str(board)]
    assert cli(capsys, tmp_path / "runs-a", "run", "--methods", "pop", *args)[0] == 0
    folder = board / "synthetic-loo-sampled_15-u40"
    index = read_evidence(folder).index
    split = prepare_split("synthetic", cache_dir=tmp_path / "runs-a" / ".cache")
    subsample = {split.user_ids[int(u)] for u in subsample_users(split.test, 40).users}
    per_user = read_evidence(folder).units[0].per_user()
    assert set(per_user["user"]) == subsample and index["n_users"] == 40 and index["eval_users"] == 40
    assert index["candidates"] == "sampled:15"
    # another machine (a fresh run store) rebuilds the same seeded candidates: same fingerprint, rows merge
    code, _, err = cli(capsys, tmp_path / "runs-b", "run", "--methods", "random", *args)
    assert code == 0, err
    assert read_evidence(folder).index["candidate_fingerprint"] == index["candidate_fingerprint"]
    assert {u.label for u in read_evidence(folder).units} == {"pop", "random"}
    code, out, err = cli(capsys, tmp_path / "runs-b", "verify", str(folder), "--check-split")
    assert code == 0, err
    assert "40 test users and their targets match" in out


def test_means_that_do_not_match_metrics_json_are_refused(published, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(published / "runs", runs)
    path = next(runs.glob("*/random/seed-0/metrics.json"))
    metrics = json.loads(path.read_text())
    metrics["means"]["hr@10"] += 0.01
    path.write_text(json.dumps(metrics))
    code, _, err = cli(capsys, runs, "leaderboard", "--dataset", "synthetic", "--leaderboards", str(tmp_path / "lb"))
    assert code == 2 and "the mean of its per-user hr@10" in one_error_line(err)


def test_zero_permutations_are_refused_by_leaderboard_and_compare(published, tmp_path, capsys):
    runs = published / "runs"
    run_id = next(runs.glob("*/run.json")).parent.name
    for argv in (["leaderboard", "--dataset", "synthetic", "--leaderboards", str(tmp_path / "lb"), "--permutations", "0"],
                 ["compare", f"{run_id}/pop", f"{run_id}/random", "--permutations", "-3"]):
        code, _, err = cli(capsys, runs, *argv)
        assert code == 2 and "positive number of permutations" in one_error_line(err)
    assert not (tmp_path / "lb").exists()


def test_a_legacy_leaderboard_without_evidence_is_replaced_with_a_note(published, tmp_path, capsys):
    board = tmp_path / "lb"
    board.mkdir()
    (board / f"{STEM}.md").write_text("# an old leaderboard, published before evidence was kept\n")
    code, _, err = cli(capsys, published / "runs", "leaderboard", "--dataset", "synthetic", "--leaderboards",
                       str(board), "--quiet")
    assert code == 0 and "was published without evidence" in err
    assert (board / STEM / "evidence.json").is_file()
    code, out, _ = cli(capsys, published / "runs", "verify", "--leaderboards", str(board))
    assert code == 0 and "verified 1 leaderboard(s)" in out


def test_labels_selects_the_rows_taken_from_the_run_store(tmp_path, capsys):
    from benchmark.cli import main

    runs, lb = tmp_path / "runs", tmp_path / "lb"
    assert main(["--runs-dir", str(runs), "run", "--methods", "pop,random", "--dataset", "synthetic", "--quiet"]) == 0
    assert main(["--runs-dir", str(runs), "leaderboard", "--dataset", "synthetic", "--labels", "pop",
                 "--leaderboards", str(lb), "--quiet"]) == 0
    rows = json.loads((lb / "synthetic-loo-full.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["pop"]
    capsys.readouterr()
    assert main(["--runs-dir", str(runs), "leaderboard", "--dataset", "synthetic", "--labels", "pop,nope",
                 "--leaderboards", str(lb), "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_run_published_without_its_manifest_reads_only_where_the_index_declares_it(board, tmp_path, capsys):
    """Evidence published while .gitignore kept runs/<id>.json out of git: the index lists those runs,
    their units read with an empty manifest, verify says so, and republishing writes no empty manifest."""
    folder = board / STEM
    index = json.loads((folder / "evidence.json").read_text())
    run_ids = sorted({u["run_id"] for u in index["units"]})
    shutil.rmtree(folder / "runs")
    code, _, err = cli(capsys, tmp_path / "runs", "verify", "--leaderboards", str(board))
    assert code == 2 and "cannot be read" in one_error_line(err)  # undeclared: an error, not a silent {}

    index["runs_without_manifest"] = run_ids
    (folder / "evidence.json").write_text(json.dumps(index, sort_keys=True, indent=1) + "\n")
    evidence = read_evidence(folder)
    assert evidence.runs_without_manifest == run_ids and all(u.run == {} for u in evidence.units)
    code, out, err = cli(capsys, tmp_path / "runs", "verify", "--leaderboards", str(board), "--check-split")
    assert code == 0, err
    assert f"no run manifest (run.json) for run(s) {', '.join(run_ids)}" in out
    assert "test users and their targets match" in out  # the split settings came from the units' configs

    before = snapshot(folder)
    code, _, err = cli(capsys, tmp_path / "runs", "leaderboard", *BASE, "--leaderboards", str(board))
    assert code == 0, err
    assert snapshot(folder) == before  # the declaration is kept, no empty runs/<id>.json appears
    md = (board / f"{STEM}.md").read_text()
    assert "**split**: loo" in md and "fingerprint " + index["split_fingerprint"] in md  # from the units' configs


@pytest.mark.parametrize("board_dir", sorted(p.parent for p in (REPO / "leaderboards").glob("*/evidence.json")),
                         ids=lambda p: p.name)
def test_the_committed_evidence_verifies_as_a_clean_clone_holds_it(board_dir):
    """Every published leaderboard's evidence, read from this checkout (CI's is a clean clone), is whole:
    each per-user value recomputes from the rankings, means and digests agree, no file is missing."""
    from benchmark.verify import verify_folder

    lines = verify_folder(board_dir)
    assert any(line.startswith(f"ok  {board_dir}") for line in lines), lines
