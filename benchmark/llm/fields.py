"""Hyperparameter fields every LLM method shares, declared once (flat, so `--set sft.lora_r=16`
still works), and the one conversion to the training loop's `TrainConfig`.

Each method redeclares the values of its reference recipe with `hp(..., source=...)`; the
declarations here fix the names, types, bounds and roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from benchmark.hparams import hp
from benchmark.llm.precision import PRECISIONS, weight_dtype
from benchmark.llm.training import TrainConfig

BUNDLED_LLM = "bundled SmolLM2-135M-Instruct"
QUANTIZE = ("none", "4bit")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class LLMFields:
    """Which model, in which precision, on how many CPU threads."""

    # fields added after results were first keyed, with the value the code behaved as before:
    # left out of keys at that value (benchmark.config.params_key), so earlier units are still found
    ADDED_LATER: ClassVar[dict[str, Any]] = {"quantize": "none"}

    llm: str | None = hp(None, none=BUNDLED_LLM)  # hub id, directory or .gguf; None: --llm, else the bundled model
    precision: str = hp("bf16", choices=PRECISIONS)
    # 4bit: NF4 QLoRA through bitsandbytes (CUDA only; LoRA only)
    quantize: str = hp("none", choices=QUANTIZE, source="the references load the model unquantized")
    # transformers' attention kernel (same math, other speed and memory); None: the model's default
    attn_implementation: str | None = hp(None, choices=ATTENTION, role="harness", none="the model's default")
    num_threads: int = hp(0, ge=0, role="harness")  # torch CPU threads during fit/rank; 0 leaves torch's setting

    def load_model(self, ctx: Any) -> Any:
        """The run's LLM with these settings, on the run's device (`benchmark.llm.loading.load_llm`)."""
        from benchmark.llm.loading import load_llm, resolve_device

        return load_llm(self.llm or ctx.llm, dtype=weight_dtype(self.precision),
                        device=resolve_device(ctx.device or "auto"), quantize=self.quantize,
                        attn_implementation=self.attn_implementation)


@dataclass
class TrainFields:
    """The fine-tuning schedule: LoRA or full, optimiser, batches, length, early stopping."""

    lora: bool = hp(True)
    lora_r: int = hp(8, ge=1)
    lora_alpha: int = hp(16, ge=1)
    lora_dropout: float = hp(0.05, ge=0, lt=1)
    lora_targets: str = hp("q_proj,v_proj")
    lr: float = hp(1e-4, gt=0)
    weight_decay: float = hp(0.0, ge=0)
    max_grad_norm: float = hp(1.0, ge=0)
    warmup_steps: int = hp(0, ge=0)
    epochs: int = hp(1, ge=1)
    batch_size: int = hp(8, ge=1)  # micro-batch; the effective batch is batch_size * grad_accum
    grad_accum: int = hp(1, ge=1)
    max_steps: int | None = hp(None, ge=1, none="the epochs", source="the references train whole epochs (no step cap)")
    max_train_examples: int | None = hp(None, ge=1, none="all")
    early_stopping: str = hp("loss", choices=("loss", "ndcg", "none"))
    valid_users: int | None = hp(None, ge=1, none="all")
    eval_every: int = hp(0, ge=0)  # optimizer steps between validations; 0 = once per epoch
    patience: int = hp(1, ge=1)
    # memory and speed, not results (harness): recompute activations in backward, compile the
    # decoder body, and write a resumable checkpoint every N optimizer steps (0: at validations)
    gradient_checkpointing: bool = hp(False, role="harness")
    compile: bool = hp(False, role="harness")
    checkpoint_every: int = hp(500, ge=0, role="harness")

    def train_config(self, *, seed: int, precision: str, progress: bool) -> TrainConfig:
        return TrainConfig(
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            max_steps=self.max_steps,
            warmup=self.warmup_steps,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            eval_every=self.eval_every,
            patience=self.patience if self.early_stopping != "none" else 0,
            precision=precision,
            seed=seed,
            max_train_examples=self.max_train_examples,
            lora=self.lora,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_targets=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()),
            gradient_checkpointing=self.gradient_checkpointing,
            compile=self.compile,
            checkpoint_every=self.checkpoint_every,
            progress=progress,
        )
