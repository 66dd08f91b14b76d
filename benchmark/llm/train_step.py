"""One optimizer step of `benchmark.llm.training.train`, on one process or data-parallel.

- The step's examples (one global batch: batch_size x grad_accum examples of the seeded
  order) are the same for any number of processes; each process takes every world-th of
  them (`my_share`) and runs them in micro-batches of at most `micro` examples. Every
  process normalises by the token count of the WHOLE global batch, and DDP averages the
  gradients over processes, so the loss is scaled by the number of processes: the update
  is the one a single process makes (up to float summation order).
- Data-parallel training goes through Hugging Face accelerate: `Accelerator().prepare` wraps
  the step's forward (`Objective`: the model plus the method's loss, so DDP's hooks see the
  forward) in DistributedDataParallel, gradients are synchronised on a process's last
  micro-batch only (`accelerator.no_sync` before it) and `accelerator.backward` runs backward.
- Out of memory: on one process the micro-batch halves and the step is redone (as
  accelerate's `find_executable_batch_size`, but halving and keeping the smaller size for
  the steps after); the global batch is unchanged, so accumulation rises in its place. Several processes would have to
  agree on the new size, so there the error stops the run (the launcher ends the others)
  with the size to set.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from benchmark.errors import ConfigError
from benchmark.llm.precision import autocast, tf32
from benchmark.parallel import Procs

log = logging.getLogger(__name__)


class Objective(torch.nn.Module):
    """The model and the method's loss as one module, so DDP wraps the step's forward."""

    def __init__(self, model: Any, loss: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, Any]]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        return self.loss(self.model, batch)


@dataclass
class Stepper:
    """What one optimizer step needs: the forward, backward and gradient-sync switch of this
    process (plain on one process, accelerate's on several), and the current micro-batch."""

    forward: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, Any]]
    backward: Callable[[torch.Tensor], None]
    no_sync: Callable[[], Any]
    optimizer: Any
    procs: Procs
    micro: int

    @classmethod
    def build(cls, model: Any, loss: Callable, optimizer: Any, device: torch.device, procs: Procs,
              micro: int) -> Stepper:
        objective = Objective(model, loss)
        if procs.world == 1:
            return cls(objective, lambda t: t.backward(), contextlib.nullcontext, optimizer, procs, micro)
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no", device_placement=False)
        wrapped, optimizer = accelerator.prepare(objective, optimizer)
        return cls(wrapped, accelerator.backward, lambda: accelerator.no_sync(wrapped), optimizer, procs, micro)


def my_share(group: np.ndarray, procs: Procs) -> np.ndarray:
    """This process's examples of a global batch: every world-th, from its rank."""
    return group[procs.rank :: procs.world]


def run_step(
    stepper: Stepper,
    group: np.ndarray,
    n_tokens: float,
    make_batch: Callable[[np.ndarray], dict[str, torch.Tensor]],
    device: torch.device,
    precision: str,
) -> tuple[float, int]:
    """Forward and backward over this process's share of one global batch, gradients
    accumulated (optimizer step left to the caller). Returns (this process's part of the
    step loss, tokens it processed); halves the micro-batch on out-of-memory (one process)."""

    while True:
        try:
            return _forward_backward(stepper, group, n_tokens, make_batch, device, precision)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not _out_of_memory(exc):
                raise
            if stepper.procs.world > 1:
                raise ConfigError(
                    f"out of memory at micro-batch {stepper.micro} on process {stepper.procs.rank} of "
                    f"{stepper.procs.world}; set batch_size={max(stepper.micro // 2, 1)} and raise grad_accum to keep "
                    "the batch, or enable gradient_checkpointing") from exc
            if stepper.micro == 1:
                raise ConfigError("out of memory with one example per micro-batch; enable gradient_checkpointing, "
                                  "use LoRA, quantize=4bit, or a smaller model") from exc
        stepper.micro //= 2
        log.warning("out of memory: micro-batch halved to %d (the batch stays; accumulation doubles)", stepper.micro)
        from accelerate.utils.memory import clear_device_cache

        clear_device_cache(garbage_collection=True)


def _out_of_memory(exc: Exception) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(exc, torch.OutOfMemoryError) or should_reduce_batch_size(exc)


def _forward_backward(stepper, group, n_tokens, make_batch, device, precision) -> tuple[float, int]:
    stepper.optimizer.zero_grad(set_to_none=True)
    share = my_share(group, stepper.procs)
    weight = float(stepper.procs.world)  # DDP averages gradients over processes
    if not len(share):  # a short last batch with fewer examples than processes: join with a zero loss
        share, weight = group[:1], 0.0
    parts = [share[i : i + stepper.micro] for i in range(0, len(share), stepper.micro)]
    total, tokens = 0.0, 0
    for j, part in enumerate(parts):
        batch = make_batch(part)
        sync = contextlib.nullcontext() if j == len(parts) - 1 else stepper.no_sync()
        with sync:
            with tf32(device), autocast(device, precision):
                loss_sum, _ = stepper.forward(batch)
            loss = loss_sum * (weight / max(n_tokens, 1))  # token mean over the whole global batch
            stepper.backward(loss)
        total += float(loss.detach()) / stepper.procs.world
        tokens += int(batch["attention_mask"].sum()) if weight else 0
    return total, tokens
