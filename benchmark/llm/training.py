"""Fine-tune a causal LM on (prompt, response) examples: LoRA (peft) or full fine-tuning.

Used by SFT, CFT, LlamaRec and CALRec. What it does:

- Logits only where there are labels: the decoder body gives the last hidden states, the
  positions whose *next* token carries a label are selected, and only those rows go through
  the LM head (`label_logits`). A [batch, seq, vocab] tensor is never built.
- Right-padded batches (pad id, attention mask, labels IGNORE on padding), gradient
  accumulation, AdamW (fused on CUDA), linear warmup then linear decay, gradient clipping,
  bf16 autocast where the precision is bf16 (CUDA, or a CPU with native bf16).
- Early stopping on a validation callback (`validate(model) -> score`, higher is better);
  the best trainable weights are restored at the end.
- Checkpoints in `work_dir` (safetensors for the trainable weights; optimizer, scheduler,
  RNG and step in `trainer_state.pt` / `trainer_state.json`). If a checkpoint of the same
  configuration is there, training continues from it; a finished run is not repeated.

The loop is one plain function so that Hugging Face accelerate can wrap it later
(`accelerator.prepare(model, optimizer)`) without a home-made launcher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmark import parallel
from benchmark.config import params_key
from benchmark.errors import ConfigError
from benchmark.llm.precision import autocast, weight_dtype
from benchmark.llm.prompts import IGNORE
from benchmark.llm.train_step import Stepper, run_step
from benchmark.store import umask_mode

Example = tuple[Sequence[int], Sequence[int]]  # (input_ids, labels)

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
# TrainConfig fields that change how training runs, not what it computes: a checkpoint
# written with one value resumes with another
HARNESS_SETTINGS = ("progress", "checkpoint_every", "gradient_checkpointing", "compile")


@dataclass
class TrainConfig:
    """Training hyperparameters, as the methods' `TrainFields.train_config()` fills them."""

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    warmup: float = 0  # a number of steps (>= 1), or a fraction of the steps (< 1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # optimizer steps between validations; 0 = once per epoch
    patience: int = 1  # validations without improvement before stopping; 0 = never stop early
    precision: str = "fp32"  # "bf16": bf16 autocast (CUDA, or a CPU with native bf16); trainable weights fp32
    fused_adam: bool = True  # on CUDA
    seed: int = 0
    max_train_examples: int | None = None  # seeded cap applied by the caller (see cap_examples)
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    master_fp32: bool = True  # full fine-tuning of a bf16/fp16 model: train fp32 weights (under autocast)
    checkpoint: bool = True  # write resumable checkpoints to work_dir
    checkpoint_every: int = 0  # also write one every this many optimizer steps (0: at validations only)
    gradient_checkpointing: bool = False  # recompute activations in backward (transformers; peft for k-bit)
    compile: bool = False  # torch.compile the decoder body for training
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return float(self.lr)

    def fingerprint(self, n_examples: int, extra: str = "") -> str:
        """Identifies a training run for resuming (settings that change no result excluded)."""
        payload = {k: v for k, v in asdict(self).items() if k not in HARNESS_SETTINGS}
        payload["lora_targets"] = list(self.lora_targets)
        payload["n_examples"] = n_examples
        payload["extra"] = extra
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    best_score: float | None
    best_step: int | None
    history: list[dict[str, float]] = field(default_factory=list)  # per validation: step, score, loss
    resumed_from: int = 0  # optimizer step the run continued from (0 = fresh)
    stopped_early: bool = False
    seconds: float = 0.0  # wall time of train() in this process
    tokens: int = 0  # tokens (incl. prompt) processed in this process
    total_tokens: int = 0  # tokens trained on across every attempt that built the checkpoint
    total_seconds: float = 0.0  # training time of this checkpoint across every attempt that built it
    prior_seconds: float = 0.0  # the part of total_seconds that earlier attempts spent (all of it when only loaded)
    micro_batch: int = 0  # the micro-batch the last step ran with (below batch_size after out-of-memory)
    processes: int = 1  # data-parallel processes

    @property
    def loaded_only(self) -> bool:
        """A finished checkpoint was loaded and no step was trained in this process."""
        return 0 < self.resumed_from == self.steps


# -- model pieces ------------------------------------------------------------------------------


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def decoder_body(model: Any) -> Any:
    """The transformer body that returns last hidden states (LoRA layers live inside it)."""
    base = base_model(model)
    get = getattr(base, "get_decoder", None)
    body = get() if callable(get) else None
    if body is None:
        body = getattr(base, "model", None)
    if body is None:
        raise ConfigError(f"{type(base).__name__} exposes no decoder body (get_decoder / .model)")
    return body


def lm_head(model: Any) -> torch.nn.Module:
    """The output projection hidden -> vocabulary logits."""
    head = base_model(model).get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(base_model(model)).__name__} has no output embeddings (lm_head)")
    return head


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head over selected hidden rows, with the model's final soft-capping/scaling if any."""
    logits = lm_head(model)(hidden)
    config = base_model(model).config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [b, s-1] of positions whose next token is labelled, and the targets there."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    return mask, shifted[mask]


def label_hidden(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden[n_labelled, d], targets[n_labelled], row_index[n_labelled]).

    hidden[i] is the last-layer state at the position that predicts targets[i]; row_index[i]
    is the batch row it belongs to.
    """
    out = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    mask, targets = label_positions(labels)
    rows = mask.nonzero(as_tuple=True)[0]
    return hidden[:, :-1][mask], targets, rows


def label_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits[n_labelled, vocab], targets[n_labelled], row_index[n_labelled]); see label_hidden."""
    hidden, targets, rows = label_hidden(model, input_ids, attention_mask, labels)
    return head_logits(model, hidden), targets, rows


def example_loss(
    model: Any, batch: dict[str, torch.Tensor], reduction: str = "mean"
) -> tuple[torch.Tensor, int]:
    """Token-level cross-entropy over labelled positions; returns (loss, n labelled tokens)."""
    logits, targets, _ = label_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
    return loss, int(targets.numel())


# -- data ---------------------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels tensors."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        if len(ids) != len(labs):
            raise ValueError(f"example {row}: {len(ids)} input ids but {len(labs)} labels")
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.as_tensor(labs, dtype=torch.long)
        attention[row, : len(ids)] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "labels": labels.to(device),
    }


def sequence_examples(
    sequences: Sequence[np.ndarray], *, history_len: int = 10, min_history: int = 1
) -> list[tuple[int, int]]:
    """(user, position) pairs: one per position t >= min_history of each user's sequence
    (target = seq[t], history = seq[max(0, t - history_len):t])."""
    pairs = []
    for user, seq in enumerate(sequences):
        for t in range(min_history, len(seq)):
            pairs.append((user, t))
    return pairs


def cap_examples(items: list, cap: int | None, seed: int) -> list:
    """A seeded random subset of at most `cap` items, kept in their original order."""
    if cap is None or cap >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=int(cap), replace=False))
    return [items[i] for i in keep]


def training_dir(ctx: Any, method: str, params: Any, inference_fields: Sequence[str], extra: str) -> Path:
    """Where a method's training checkpoints live.

    With a model cache (ctx.cache_dir, the run store's; None under --force) the directory is
    keyed by what determines training: the method, every hyperparameter except those that only
    change inference (`inference_fields`), the seed and `extra` (model path, data fingerprint,
    validation set...). Units that differ only in inference settings, the evaluated users or the
    candidate protocol then train once. Without a cache: the unit's own work directory.
    """
    cache = getattr(ctx, "cache_dir", None)
    if cache is None:
        return Path(ctx.work_dir)
    values = {k: v for k, v in params_key(params).items() if k not in set(inference_fields)}
    payload = json.dumps([method, values, int(ctx.seed), extra], sort_keys=True, default=str)
    return Path(cache) / "models" / f"{method}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


# -- LoRA -----------------------------------------------------------------------------------------


def apply_lora(model: Any, config: TrainConfig) -> Any:
    """Wrap `model` with LoRA adapters on `config.lora_targets` (peft); only adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ConfigError("LoRA needs the `peft` package: pip install peft (or train with lora=false)") from exc
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.lora_targets if t not in names]
    if missing:
        raise ConfigError(
            f"LoRA targets {missing} are not modules of {type(model).__name__}; set lora_targets to some of its "
            "linear layers (e.g. q_proj,k_proj,v_proj,o_proj)"
        )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def is_quantized(model: Any) -> bool:
    """Loaded in 4 or 8 bits by bitsandbytes (QLoRA)."""
    base = base_model(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def prepare_model(model: Any, config: TrainConfig) -> Any:
    """LoRA-wrap (adapter init seeded by config.seed), or make every parameter trainable.

    A 4/8-bit model goes through peft's `prepare_model_for_kbit_training` first (norms in
    fp32, input gradients on, gradient checkpointing if asked) and trains LoRA only.
    Gradient checkpointing is transformers' (non-reentrant, so DDP and frozen inputs work);
    with LoRA the input embeddings' outputs require grad (`enable_input_require_grads`)."""
    ckpt_kwargs = {"use_reentrant": False}
    if is_quantized(model):
        if not config.lora:
            raise ConfigError("a 4-bit model can only train LoRA adapters: set lora=true (QLoRA) or quantize=none")
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        if config.lora:
            model.enable_input_require_grads()
    if config.lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return apply_lora(model, config)
    if config.master_fp32 and next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        model = model.float()  # AdamW updates on 16-bit weights lose most small steps
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (LoRA adapters, or every weight), detached CPU copies."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise ConfigError(f"checkpoint holds weights this model lacks ({missing[:3]}...); delete the work dir")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def merge_for_inference(model: Any, precision: str = "fp32") -> Any:
    """Fold LoRA adapters into the base weights (faster decoding) and store the weights in
    the run's precision (full fine-tuning trained an fp32 copy; bf16 decodes under autocast)."""
    if is_quantized(model):  # adapters stay beside the 4-bit weights (merging would requantize them)
        return model.eval()
    merge = getattr(model, "merge_and_unload", None)
    model = merge() if callable(merge) else model
    model.to(weight_dtype(precision))
    model.eval()
    return model


# -- checkpoints ------------------------------------------------------------------------------------


def _atomic_dir_write(target: Path, write: Callable[[Path], None]) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _param_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict, best: dict | None) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                # the training device's generator only: restoring all would fail with fewer GPUs
                "cuda_rng": torch.cuda.get_rng_state(_param_device(model)) if _param_device(model).type == "cuda" else None,
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        mode = umask_mode()  # safetensors writes 0600 whatever the umask; the store's files follow it
        for file in tmp.iterdir():
            os.chmod(file, mode)

    _atomic_dir_write(path, write)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, restore_rng: bool = True) -> dict | None:
    """Restore trainable weights, optimizer, scheduler (and RNG) from a checkpoint; return its best weights."""
    from safetensors.torch import load_file

    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    extra = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    device = _param_device(model)
    if restore_rng:
        torch.set_rng_state(extra["torch_rng"])
        cuda_rng = extra.get("cuda_rng")
        if isinstance(cuda_rng, torch.Tensor) and device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, device)
    return load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None


def read_checkpoint_state(path: Path) -> dict | None:
    f = path / "trainer_state.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


# -- the loop ------------------------------------------------------------------------------------------


def _schedule(total_steps: int, warmup: float) -> Callable[[int], float]:
    warm = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    warm = min(warm, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / (warm + 1)
        rest = max(total_steps - warm, 1)
        return max(0.0, 1.0 - (step - warm) / rest)

    return factor


def make_optimizer(params: list, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if config.fused_adam and device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def loss_validator(
    examples: Sequence[Example],
    pad_id: int,
    *,
    batch_size: int = 16,
    precision: str = "fp32",
    token_weights: Callable[[int], np.ndarray] | None = None,
) -> Callable[[Any], float]:
    """A validation callback: minus the mean token loss on `examples` (higher is better).

    token_weights(n) gives the weights of an example's n labelled tokens (CFT weighs its
    evaluation loss this way); the loss is then the weighted sum over the weight total."""

    def validate(model: Any) -> float:
        total, count = 0.0, 0.0
        was_training = model.training
        model.eval()
        for losses, rows, n_rows in token_losses(model, examples, pad_id, batch_size=batch_size, precision=precision):
            if token_weights is None:
                total += float(losses.sum())
                count += int(losses.numel())
                continue
            counts = torch.bincount(rows, minlength=n_rows).tolist()
            w = torch.from_numpy(np.concatenate([token_weights(c) for c in counts if c])).to(losses.device)
            total += float((losses * w).sum())
            count += float(w.sum())
        model.train(was_training)
        return -total / max(count, 1e-12)

    return validate


def token_losses(
    model: Any, examples: Sequence[Example], pad_id: int, *, batch_size: int = 16, precision: str = "fp32"
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per batch of `examples`, without gradients: (fp32 cross-entropy of each labelled token,
    the example row of each within the batch, the batch's number of examples)."""
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_id, device)
            logits, targets, rows = label_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            yield F.cross_entropy(logits.float(), targets, reduction="none"), rows, len(chunk)


def train(
    model: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    pad_id: int,
    work_dir: str | os.PathLike | None = None,
    validate: Callable[[Any], float] | None = None,
    fingerprint_extra: str = "",
    collate_fn: Callable[..., dict[str, torch.Tensor]] | None = None,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, Any]] | None = None,
    example_weight: Callable[[Any], float] | None = None,
) -> tuple[Any, TrainResult]:
    """Train `model` (already LoRA-wrapped or not: see `prepare_model`) on `examples`.

    Returns the model (best validation weights loaded when `validate` is given) and a
    TrainResult. Methods with another objective (CFT) pass `collate_fn(examples, pad_id,
    device) -> batch`, `loss_fn(model, batch) -> (loss sum, normaliser)` and
    `example_weight(example) -> float` (its share of the step's normaliser); the defaults
    are right-padded token cross-entropy averaged over the step's labelled tokens.
    With `work_dir`, checkpoints go to work_dir/checkpoint after each validation (or
    epoch) and every `checkpoint_every` steps, and a rerun with the same config and data
    resumes from them, mid-epoch included.

    Under several processes (`benchmark.parallel`) every process calls this with the same
    examples; each runs its share of every global batch (`train_step`), validation scores
    and early stopping follow rank 0, and rank 0 alone writes checkpoints.
    """
    if not examples:
        raise ConfigError("no training examples: the training sequences are too short (need 2+ items per user)")
    t_start = time.perf_counter()
    procs = parallel.current()
    device = next(model.parameters()).device
    make_batch = collate_fn or collate
    compute_loss = loss_fn or (lambda m, b: example_loss(m, b, reduction="sum"))
    weigh = example_weight or (lambda ex: int(np.count_nonzero(np.asarray(ex[1][1:]) != IGNORE)))
    n = len(examples)
    micro_per_epoch = math.ceil(n / config.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / config.grad_accum))
    total_steps = int(config.max_steps) if config.max_steps else steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; use prepare_model(model, config) first")
    optimizer = make_optimizer(params, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, config.warmup))

    fp = config.fingerprint(n, fingerprint_extra)
    ckpt = Path(work_dir) / CHECKPOINT_DIR if (work_dir is not None and config.checkpoint) else None
    step = 0
    best: dict | None = None
    state: dict[str, Any] = {"fingerprint": fp, "step": 0, "best_score": None, "best_step": None,
                             "bad_evals": 0, "history": [], "done": False, "stopped_early": False}
    resumed_from = 0
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    body = decoder_body(model)
    with torch.random.fork_rng(devices=cuda_devices), compiled(body, config.compile):
        torch.manual_seed(config.seed + procs.rank)
        prior = read_checkpoint_state(ckpt) if ckpt is not None else None
        if prior is not None and prior.get("fingerprint") == fp:
            best = load_checkpoint(ckpt, model, optimizer, scheduler, restore_rng=procs.main)
            state = prior
            step = resumed_from = int(prior["step"])
        prior_seconds = float(state.get("train_seconds", 0.0))  # absent in checkpoints older than the field
        prior_tokens = state.get("train_tokens")  # likewise; None: unknown for the earlier attempts

        stepper = Stepper.build(model, compute_loss, optimizer, device, procs, config.batch_size)
        tokens = 0
        model.train()
        bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (config.progress and procs.main),
                   dynamic_ncols=True)
        running: list[float] = []

        def save() -> None:
            state["step"] = step
            state["train_seconds"] = prior_seconds + time.perf_counter() - t_start
            if prior_tokens is not None or resumed_from == 0:
                state["train_tokens"] = int(prior_tokens or 0) + tokens
            if ckpt is not None and procs.main:
                save_checkpoint(ckpt, model, optimizer, scheduler, state, best)

        while step < total_steps and not state["done"]:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(n)
            first_micro = step_in_epoch * config.grad_accum
            micro_batches = [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
            for group_start in range(first_micro, len(micro_batches), config.grad_accum):
                group = np.concatenate(micro_batches[group_start : group_start + config.grad_accum])
                n_tokens = sum(weigh(examples[i]) for i in group)  # the whole global batch's
                step_loss, step_tokens = run_step(
                    stepper, group, n_tokens, lambda rows: make_batch([examples[i] for i in rows], pad_id, device),
                    device, config.precision)
                step_loss, step_tokens = parallel.all_sum([step_loss, step_tokens], _collective_device(device))
                tokens += int(step_tokens)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                stepper.optimizer.step()
                scheduler.step()
                step += 1
                running.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
                end_of_epoch = group_start + config.grad_accum >= len(micro_batches)
                if step % eval_every == 0 or step >= total_steps or (end_of_epoch and not config.eval_every):
                    record: dict[str, Any] = {"step": step, "train_loss": float(np.mean(running[-eval_every:]))}
                    if validate is not None:
                        score = parallel.broadcast(float(validate(model)))  # every process decides alike
                        model.train()
                        record["score"] = score
                        if state["best_score"] is None or score > state["best_score"]:
                            state["best_score"], state["best_step"], state["bad_evals"] = score, step, 0
                            best = trainable_state(model)
                        else:
                            state["bad_evals"] += 1
                        if config.patience and state["bad_evals"] >= config.patience:
                            state["stopped_early"] = True
                            state["done"] = True
                    state["history"].append(record)
                    if step >= total_steps:
                        state["done"] = True
                    save()
                elif config.checkpoint_every and step % config.checkpoint_every == 0:
                    save()  # mid-epoch: a long epoch resumes from here
                if step >= total_steps or state["done"]:
                    break
        bar.close()
        if best is not None:
            load_trainable_state(model, best)
    model.eval()
    return model, TrainResult(
        steps=step,
        epochs_done=step / steps_per_epoch,
        best_score=state["best_score"],
        best_step=state["best_step"],
        history=list(state["history"]),
        resumed_from=resumed_from,
        stopped_early=bool(state["stopped_early"]),
        seconds=time.perf_counter() - t_start,
        # the training time the last checkpoint recorded (so a later load reports the same
        # figure); a finished checkpoint only loaded here adds no training time
        total_seconds=(float(state["train_seconds"]) if ckpt is not None and "train_seconds" in state
                       else prior_seconds + (time.perf_counter() - t_start if step > resumed_from else 0.0)),
        prior_seconds=prior_seconds,
        tokens=tokens,
        total_tokens=int(state["train_tokens"]) if "train_tokens" in state else tokens,
        micro_batch=stepper.micro,
        processes=procs.world,
    )


def _collective_device(device: torch.device) -> torch.device:
    """Where collectives put their tensors: the GPU under nccl, the CPU under gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


@contextlib.contextmanager
def compiled(body: torch.nn.Module, enabled: bool):
    """torch.compile the decoder body for the block (dynamic shapes: batches vary in length);
    decoding afterwards runs the eager module (its cache and attention hooks change shapes)."""
    if not enabled:
        yield
        return
    body.compile(dynamic=True)
    try:
        yield
    finally:
        body._compiled_call_impl = None  # nn.Module.compile's handle: back to eager
