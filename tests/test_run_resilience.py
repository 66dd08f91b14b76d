"""Whole processes against one run store: kill -9 then resume, and two runs at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(runs: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark", "--runs-dir", str(runs), "run", "--quiet", *args]


def env(**extra: str) -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1", **extra}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start_gated_run(runs: Path, gate: Path, run_id: str) -> tuple[list[str], subprocess.Popen, Path]:
    """pop then a Gate method that waits in fit while `gate` exists; returns once pop's unit is written."""
    gate.touch()
    argv = command(runs, "--methods", "pop,gate_plugin:Gate", "--dataset", "synthetic", "--run-id", run_id)
    proc = subprocess.Popen(argv, env=env(GATE_FILE=str(gate)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pop = runs / run_id / "pop" / "seed-0"
    deadline = time.monotonic() + 120
    while not (pop / "metrics.json").is_file():  # pop is finished; Gate now waits in fit
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "pop never finished"
        time.sleep(0.1)
    time.sleep(0.3)
    return argv, proc, pop


def test_kill_9_mid_run_then_the_same_command_resumes(tmp_path):
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    argv, proc, pop = start_gated_run(runs, gate, "k")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    kept = files(pop)
    assert set(kept) == {"config.json", "metrics.json", "per_user.jsonl", "rankings.jsonl"}
    assert json.loads((runs / "k" / "run.json").read_text())["status"] == "running"  # nobody could say otherwise
    assert not (runs / "k" / "gate").exists()  # no half-written unit
    gate.unlink()
    done = subprocess.run(argv, env=env(GATE_FILE=str(gate)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "reused" in done.stdout.splitlines()[-3]  # the pop row
    assert files(pop) == kept
    meta = json.loads((runs / "k" / "run.json").read_text())
    assert meta["status"] == "finished" and set(meta["stages"]) == {"pop/seed-0", "gate/seed-0"}


def test_sigterm_mid_run_marks_the_run_interrupted_and_keeps_finished_units(tmp_path):
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    _, proc, pop = start_gated_run(runs, gate, "t")
    proc.send_signal(signal.SIGTERM)  # what `kill PID` and most job schedulers send
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in err and "rerun the same command to resume" in err
    meta = json.loads((runs / "t" / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["error"] == "KeyboardInterrupt"
    assert (pop / "metrics.json").is_file() and not (runs / "t" / "gate").exists()


def test_two_runs_at_once_into_one_store(tmp_path):
    runs = tmp_path / "runs"
    argv = command(runs, "--methods", "pop,random", "--dataset", "synthetic:seed=7")
    procs = [subprocess.Popen(argv + ["--run-id", f"c{i}"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    for label in ("pop", "random"):  # the same units, byte for byte (deterministic), whichever finished first
        a, b = (files(runs / f"c{i}" / label / "seed-0") for i in range(2))
        assert a["per_user.jsonl"] == b["per_user.jsonl"] and a["rankings.jsonl"] == b["rankings.jsonl"]
    splits = [p for p in (runs / ".cache" / "splits").iterdir()]
    assert len(splits) == 1 and (splits[0] / "split.json").is_file()  # one cached split, no temp leftovers
    for run_id in ("c0", "c1"):
        assert json.loads((runs / run_id / "run.json").read_text())["status"] == "finished"
