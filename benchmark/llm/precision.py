"""Precision and threads for the LLM layer, shared by every LLM method.

- `precision="bf16"`: weights load in bf16, forward and backward run under bf16 autocast
  (CUDA, and CPUs with native bf16: AVX512-BF16 or AMX); trainable weights and optimizer
  state stay fp32 (full fine-tuning trains an fp32 copy; LoRA adapters are fp32).
  `precision="fp32"`: everything fp32. The recipe layer replaces bf16 by fp32 where the
  hardware has no native bf16 and names that departure (`benchmark.recipes`).
- Training steps on CUDA run with TF32 on (`tf32`); nothing that ranks does.
- Anything that ranks is computed in fp32: `fp32_head(model)` makes the output projection
  run in fp32 on fp32 copies of its input and weight (bf16 logits of magnitude 20-30 have
  a step of 0.125 and tie), and callers take embedding distances on `.float()` states.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

PRECISIONS = ("bf16", "fp32")


def weight_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast on the device for precision "bf16", else a no-op."""
    device = torch.device(device)
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_precision(model: Any) -> str:
    """"bf16" when the model's floating weights are bf16 (it then decodes under bf16 autocast)."""
    for p in model.parameters():
        if p.is_floating_point():
            return "bf16" if p.dtype == torch.bfloat16 else "fp32"
    return "fp32"


@contextlib.contextmanager
def fp32_head(model: Any) -> Iterator[None]:
    """Within the block, the model's output embeddings compute fp32 logits from fp32 copies
    of their input and weight, outside any autocast (scores that rank stay exact)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        yield
        return
    original = head.forward
    cached: dict[str, Any] = {}

    def weight32() -> torch.Tensor:
        # Casting a bf16 head to fp32 on every decoding step cost more than the rest of the
        # step (SmolLM2's 49152 x 576 head: 114 ms cast-and-multiply against 29 ms with the copy
        # made once, 1 thread), so the fp32 copy is made once per block and remade only if the
        # weight changes in place (its version counter) or gradients must flow through it.
        w = head.weight
        if w.dtype == torch.float32 or (torch.is_grad_enabled() and w.requires_grad):
            return w.float()
        key = (w.data_ptr(), w._version)
        if cached.get("key") != key:
            cached["weight"], cached["key"] = w.detach().float(), key
        return cached["weight"]

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(x.float(), weight32(), bias)

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        head.forward = original  # type: ignore[method-assign]


@contextlib.contextmanager
def tf32(device: torch.device | str) -> Iterator[None]:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA within the block (training
    steps), restored after: what ranks (fp32_head, similarities) runs outside it in true fp32."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def fp32(device: torch.device | str = "cpu"):
    """No autocast inside: products that rank (similarities, distances) run in fp32."""
    return torch.autocast(torch.device(device).type, enabled=False)


@contextlib.contextmanager
def inference_precision(model: Any) -> Iterator[None]:
    """Decode a model in its own precision: bf16 autocast for bf16 weights, fp32 head."""
    device = next(model.parameters()).device
    with autocast(device, model_precision(model)), fp32_head(model):
        yield


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run with n torch intra-op threads (0: unchanged), restoring the previous count."""
    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
