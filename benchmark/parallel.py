"""Several processes, one run: data-parallel training and sharded evaluation.

Launched by Hugging Face accelerate or torchrun, one process per GPU (or N CPU processes):

    accelerate launch --num_processes 4 -m benchmark run --methods cft,sft
    torchrun --nproc_per_node 2 -m benchmark run --methods pop,sft       # CPU: gloo

`start(device_kind)` reads the launcher's environment through accelerate's `PartialState`
(nccl on CUDA, gloo on the CPU) and returns this process's `Procs`; without a launcher it
is one process and nothing is initialised. Every process then runs the same run: LLM
training is data-parallel inside `benchmark.llm.training.train` (accelerate's DDP wrapper);
evaluation gives each process every world-th test user (`shard_request`), rank 0 gathers
the lists (`gather`), puts them back in the request's order (`merge_ranked`) and alone
scores them and writes the run store, so the store is the one a single process writes.
Classic methods (SASRec) are trained by every process alike (same seed, same data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from benchmark.errors import ConfigError
from benchmark.types import CandidateSet, RankedLists, RankRequest


@dataclass(frozen=True)
class Procs:
    """This process's place among the run's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def current() -> Procs:
    """The processes of the initialised process group (one process when there is none)."""
    dist = _dist()
    if dist is None:
        return Procs()
    rank = dist.get_rank()
    return Procs(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_kind: str) -> Procs:
    """Join the launcher's process group (nccl on CUDA, gloo on the CPU); one process without one."""
    if not launched() or _dist() is not None:
        return current()
    from accelerate import PartialState

    PartialState(cpu=device_kind == "cpu")
    return current()


def process_device(device: str, procs: Procs) -> str:
    """The device of this process: under a launcher each process takes cuda:LOCAL_RANK.

    `--device cuda:N` picks one GPU for a single process; with several processes it would
    put them all on one GPU, so it is refused there."""
    if procs.world == 1 or not device.startswith("cuda"):
        return device
    if ":" in device:
        raise ConfigError(f"--device {device} selects one GPU, but this run has {procs.world} processes, each on "
                          "its own GPU (cuda:LOCAL_RANK); pass --device cuda (or auto)")
    return f"cuda:{procs.local_rank}"


# -- collectives (torch.distributed; no-ops for one process) ---------------------------------------


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's value on every process."""
    dist = _dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any] | None:
    """Every process's value, in rank order, on rank 0 (None elsewhere)."""
    dist = _dist()
    if dist is None:
        return [value]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def all_sum(values: list[float], device: Any = "cpu") -> list[float]:
    """Element-wise sum over processes (float64 on the process group's device)."""
    dist = _dist()
    if dist is None:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -- sharded evaluation -------------------------------------------------------------------------------


def shard_rows(n: int, procs: Procs) -> np.ndarray:
    """The rows this process evaluates: every world-th, from its rank."""
    return np.arange(procs.rank, n, procs.world, dtype=np.int64)


def shard_request(request: RankRequest, procs: Procs) -> RankRequest:
    if procs.world == 1:
        return request
    rows = shard_rows(len(request.users), procs)
    cands = request.candidates
    shard_cands = CandidateSet(cands.protocol, np.asarray(cands.users)[rows],
                               None if cands.items is None else np.asarray(cands.items)[rows], cands.exclude_seen)
    return replace(request, users=np.asarray(request.users)[rows],
                   histories=[request.histories[int(r)] for r in rows], candidates=shard_cands)


def merge_ranked(parts: list[RankedLists]) -> RankedLists:
    """One RankedLists from the processes' parts (rows concatenated; the runner reorders them).

    Run-level `info` is rank 0's; facts computed from the users (e.g. how many positions were
    filled) are recomputed on the merged lists by the method's `ranking_info`, when it has one."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    widths = {p.items.shape[1] for p in parts if len(p.users)}
    width = max(widths) if widths else first.items.shape[1]

    def pad(a: np.ndarray, fill: Any) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) if a.shape[1] < width else a

    from benchmark.types import PAD

    items = np.concatenate([pad(np.asarray(p.items, dtype=np.int64), PAD) for p in parts])
    scores = None
    if first.scores is not None:
        scores = np.concatenate([pad(np.asarray(p.scores, dtype=np.float64), -np.inf) for p in parts])
    extras = {name: np.concatenate([np.asarray(p.extras[name]) for p in parts]) for name in first.extras}
    stage = None
    if first.first_stage is not None:
        stage = merge_ranked([p.first_stage for p in parts])  # type: ignore[misc]
    users = np.concatenate([np.asarray(p.users, dtype=np.int64) for p in parts])
    return RankedLists(users, items, scores, extras, dict(first.info), stage)
