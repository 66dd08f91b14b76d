"""Data-parallel training and sharded evaluation as two CPU processes over gloo.

- training: `train` under two processes (accelerate's DDP wrapper, same global batch) gives
  the single process's step losses within 1e-5 relative (float summation order differs:
  each process sums its half of the batch, then the halves are averaged);
- evaluation: `python -m benchmark run` under `torchrun --nproc_per_node 2` writes a run
  store whose rankings and per-user metrics are byte-identical to one process's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.llm.loading import tiny_llm
from benchmark.llm.training import TrainConfig, prepare_model, train

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(lora=True, lr=5e-3, max_steps=4, batch_size=3, grad_accum=2, eval_every=1, patience=0, warmup=0,
              lora_dropout=0.0, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(n_examples: int = 15) -> tuple[list[float], dict[str, torch.Tensor]]:
    from tests.test_llm_training import some_examples

    llm = tiny_llm(seed=1)
    config = TrainConfig(**CONFIG)
    model, result = train(prepare_model(llm.model, config), some_examples(llm, n_examples), config, pad_id=llm.pad_id)
    weights = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    return [h["train_loss"] for h in result.history], weights


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from benchmark import parallel

    procs = parallel.start("cpu")
    assert procs.world == world and procs.rank == rank
    losses, weights = step_losses()
    if procs.main:
        torch.save({"losses": losses, "weights": weights}, out)
    parallel.barrier()


def test_two_process_training_matches_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    losses, weights = step_losses()
    assert len(ddp["losses"]) == len(losses) == 4
    np.testing.assert_allclose(ddp["losses"], losses, rtol=1e-5)
    for name, w in weights.items():  # the same updates: the processes trained one model
        torch.testing.assert_close(ddp["weights"][name], w, atol=1e-5, rtol=1e-4)
    assert losses[0] != losses[-1]  # it trained


def _run(args: list[str], runs: Path, procs: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                 "--master_port", str(free_port())] if procs > 1 else [sys.executable])
    cmd = launcher + ["-m", "benchmark", "--runs-dir", str(runs), "run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.integration
def test_torchrun_two_processes_write_the_one_process_store(tmp_path):
    model_dir = tmp_path / "tiny"
    llm = tiny_llm(seed=2)
    llm.model.save_pretrained(model_dir)
    llm.tokenizer.save_pretrained(model_dir)
    args = ["--methods", "pop,sasrec,sft", "--dataset", "synthetic", "--device", "cpu", "--run-id", "r", "--quiet",
            "--llm", str(model_dir), "--set", "sasrec.epochs=2", "--set", "sft.max_train_examples=24",
            "--set", "sft.epochs=1", "--set", "sft.valid_users=8", "--set", "sft.grounding=trie",
            "--set", "sft.num_beams=2", "--set", "sft.max_new_tokens=8", "--set", "sft.lora_dropout=0"]
    stores = {}
    for procs in (1, 2):
        done = _run(args, tmp_path / f"runs{procs}", procs)
        assert done.returncode == 0, done.stderr[-3000:]
        stores[procs] = tmp_path / f"runs{procs}" / "r"
    meta = {p: json.loads((stores[p] / "run.json").read_text()) for p in stores}
    assert meta[1]["manifest"]["processes"] == 1 and meta[2]["manifest"]["processes"] == 2
    for label in ("pop", "sasrec"):  # trained alike in every process: sharding alone differs
        for name in ("rankings.jsonl", "per_user.jsonl"):
            a = (stores[1] / label / "seed-0" / name).read_bytes()
            assert a == (stores[2] / label / "seed-0" / name).read_bytes(), f"{label}/{name}"
    # the LLM trained data-parallel: its lists cover every user once, in the store of rank 0 only
    rows = [json.loads(line) for line in (stores[2] / "sft" / "seed-0" / "rankings.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (stores[1] / "sft" / "seed-0" / "rankings.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in rows] == [r["uid"] for r in one]
    notes = json.loads((stores[2] / "sft" / "seed-0" / "metrics.json").read_text())
    assert notes["processes"] == 2


def test_peak_memory_is_per_unit():
    """The runner resets the peak at each unit's start: a large first unit does not show up in
    the second unit's figure (Linux: VmHWM, reset through /proc/self/clear_refs)."""
    from benchmark.manifest import peak_memory_mb, reset_peak_memory

    reset_peak_memory("cpu")
    block = np.ones(200 * 2**20 // 8)  # 200 MiB touched
    first = peak_memory_mb("cpu")["cpu_rss_mb"]
    del block
    reset_peak_memory("cpu")
    second = peak_memory_mb("cpu")["cpu_rss_mb"]
    assert first - second > 150


def test_shards_cover_every_user_once_and_merge_back():
    from benchmark.parallel import Procs, merge_ranked, shard_request
    from benchmark.types import CandidateSet, RankedLists, RankRequest

    users = np.arange(7, dtype=np.int64) + 10
    request = RankRequest(users, [np.array([i]) for i in range(7)], CandidateSet("sampled:3", users,
                          np.arange(21).reshape(7, 3)), k=2)
    parts = [shard_request(request, Procs(r, 3, r)) for r in range(3)]
    assert sorted(np.concatenate([p.users for p in parts]).tolist()) == users.tolist()
    for p in parts:  # each shard keeps its users' own histories and candidates
        rows = p.users - 10
        assert [int(h[0]) for h in p.histories] == rows.tolist()
        assert (p.candidates.items == np.arange(21).reshape(7, 3)[rows]).all()
    ranked = [RankedLists(p.users, p.candidates.items[:, :2], extras={"valid": np.ones(len(p.users))},
                          info={"shard": i}) for i, p in enumerate(parts)]
    merged = merge_ranked(ranked)
    order = np.argsort(merged.users)
    assert (merged.items[order] == np.arange(21).reshape(7, 3)[:, :2]).all()
    assert merged.info == {"shard": 0} and len(merged.extras["valid"]) == 7
