"""SFT: supervised fine-tuning of an LLM to name the next item (BIGRec-style).

Bao et al., "A Bi-Step Grounding Paradigm for Large Language Models in Recommendation
Systems" (BIGRec, 2023). The LLM reads an instruction and the user's last N items as
quoted titles, and is fine-tuned (LoRA on q/k/v/o by default) to answer with the next
item's text; loss only on the answer tokens and eos.

Ranking: the model's answer is grounded to catalog items in one of three ways:

- ``grounding="trie"`` (default): beam search constrained by a token trie of every catalog
  item's text, so every answer is a real item; the user's seen items are pruned inside the
  search; items are ranked by sequence log-probability (up to k distinct items per user).
- ``grounding="l2"`` (BIGRec's grounding): free beam search, then the top beam's text is
  embedded with the fine-tuned model's last hidden state and items are ranked by L2
  distance to each item text's embedding (item embeddings computed once per fit).
- ``grounding="exact"``: free beam search; beams whose text equals a catalog item's text
  name that item (duplicates name every matching id), best beam first.

Candidates: with a sampled or retrieved candidate set, every non-candidate item is added to
the user's exclusion list, so the trie search (and the L2/exact grounding) only returns
candidates. Where fewer than k items come back (few beams, few candidates) the row is
PAD-filled; `info["note"]` says so.

Device-dependent defaults ("auto"): on CUDA every training position is an example, 512
validation users, 20 beams; on CPU 256 examples, 32 validation users, 10 beams, so that a
CPU run of ML-100K with ~100 evaluated users takes about 20 minutes (bench/RESULTS.md).
BIGRec's own setting is 1,024 examples: `--set sft.max_train_examples=1024`.
A rerun with the same training configuration resumes from (or reuses) its checkpoint, kept in the
run store's model cache by a key of every hyperparameter but the inference-only ones
(`training_dir`), so another grounding, another --eval-users or --candidates trains nothing new.

Early stopping: ``early_stopping="loss"`` (default, cheap) keeps the weights with the lowest
loss on a seeded subset of validation users; ``"ndcg"`` ranks that subset with the trie and
keeps the best validation NDCG@10 (via ctx.validate); ``"none"`` trains the full schedule.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmark.errors import ConfigError
from benchmark.llm.loading import LLM, load_llm, resolve_device
from benchmark.llm.prompts import (
    ITEM_TEXT_STYLES,
    catalog_texts,
    encode_examples,
    get_template,
    prompt_ids_batch,
    response_ids_batch,
)
from benchmark.llm.training import (
    TrainConfig,
    TrainResult,
    cap_examples,
    loss_validator,
    merge_for_inference,
    prepare_model,
    sequence_examples,
    train,
    training_dir,
)
from benchmark.registry import Method, register_method
from benchmark.types import PAD, CandidateSet, RankedLists, RankRequest, TrainData

GROUNDINGS = ("trie", "l2", "exact")


def _auto_int(
    value: Any, name: str, auto: int | None, allow_all: bool = False, method: str = "sft", minimum: int = 1
) -> int | None:
    """Params typed str so that "auto" (and "all") fit beside integers; errors name `method.name`."""
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return auto
    if allow_all and text in ("all", "none"):
        return None
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{method}.{name}={value!r}: expected an integer or 'auto'") from None
    if not number.is_integer() or number < minimum:
        raise ConfigError(f"{method}.{name}={value!r}: must be an integer >= {minimum}")
    return int(number)


@dataclass
class SFTParams:
    """Hyperparameters. LoRA r=8, alpha=16, dropout 0.05 on q/k/v/o as BIGRec; BIGRec trains
    on 1,024 sampled examples (the CPU default here), on GPU every training position is used.
    Auto values depend on the device: see `resolved()`."""

    llm: str | None = None  # None: --llm (ctx.llm), else the bundled SmolLM2-135M-Instruct
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    item_text: str = "title_year"
    prompt: str = "movie"  # prompt template name (benchmark.llm.prompts.TEMPLATES)
    history_len: int = 10
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lr: float | None = None  # None: 3e-4 with LoRA, 3e-5 full fine-tuning
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    max_train_examples: str = "auto"  # "auto" (256 on CPU, all on CUDA), "all", or a number
    early_stopping: str = "loss"  # "loss" | "ndcg" | "none"; skipped when only one validation would run
    valid_users: str = "auto"  # validation users for early stopping: auto = 32 on CPU, 512 on CUDA
    eval_every: int = 0  # optimizer steps between validations; 0 = once per epoch
    patience: int = 3
    grounding: str = "trie"  # "trie" | "l2" | "exact"
    num_beams: str = "auto"  # auto = 20 on CUDA, 10 on CPU
    max_new_tokens: int = 32  # free generation (l2/exact)
    eval_batch_size: int = 8
    num_threads: int = 0  # torch CPU threads during fit/rank (restored after); 0 leaves torch's setting

    def __post_init__(self) -> None:
        if self.grounding not in GROUNDINGS:
            raise ValueError(f"grounding must be one of {', '.join(GROUNDINGS)}, got {self.grounding!r}")
        if self.early_stopping not in ("loss", "ndcg", "none"):
            raise ValueError(f"early_stopping must be loss, ndcg or none, got {self.early_stopping!r}")
        if self.item_text not in ITEM_TEXT_STYLES:
            raise ValueError(f"item_text must be one of {', '.join(ITEM_TEXT_STYLES)}, got {self.item_text!r}")
        if self.history_len < 1:
            raise ValueError("history_len must be at least 1")

    def resolved(self, device: torch.device) -> dict[str, int | None]:
        gpu = device.type == "cuda"
        return {
            # CPU: 256 examples (not BIGRec's 1,024) so that a default CPU run fits in ~20 minutes;
            # bench/RESULTS.md has the timings behind this choice
            "max_train_examples": _auto_int(self.max_train_examples, "max_train_examples", None if gpu else 256,
                                            allow_all=True),
            "valid_users": _auto_int(self.valid_users, "valid_users", 512 if gpu else 32, allow_all=True),
            "num_beams": _auto_int(self.num_beams, "num_beams", 20 if gpu else 10),
        }


@contextlib.contextmanager
def cpu_threads(n: int):
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


def history_texts(texts: list[str], history: np.ndarray, n: int) -> list[str]:
    return [texts[int(i)] for i in np.asarray(history)[-n:]]


def exclusions(request: RankRequest, n_items: int) -> list[np.ndarray]:
    """Per user: the seen items (when the candidate set excludes them) plus every non-candidate."""
    cand: CandidateSet = request.candidates
    out = []
    everything = np.arange(n_items, dtype=np.int64)
    for row, hist in enumerate(request.histories):
        parts = []
        if cand.exclude_seen:
            parts.append(np.asarray(hist, dtype=np.int64))
        if cand.items is not None:
            allowed = cand.items[row]
            parts.append(np.setdiff1d(everything, allowed[allowed >= 0]))
        out.append(np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64))
    return out


@register_method("sft")
class SFT(Method):
    """Fine-tune an LLM to generate the next item's text; ground generations to catalog ids."""

    Params = SFTParams
    uses_llm = True

    def __init__(self, params: SFTParams, ctx):
        super().__init__(params, ctx)
        self.llm: LLM | None = None
        self.texts: list[str] = []
        self.trie = None
        self.item_embeddings: torch.Tensor | None = None
        self.result: TrainResult | None = None
        self.n_train = 0

    # -- setup ---------------------------------------------------------------------------------
    def _load(self) -> LLM:
        p = self.params
        device = resolve_device(self.ctx.device or "auto")
        return load_llm(p.llm or self.ctx.llm, dtype=p.dtype, device=device)

    def train_config(self, device: torch.device) -> TrainConfig:
        p = self.params
        auto = p.resolved(device)
        return TrainConfig(
            lr=p.lr,
            epochs=p.epochs,
            batch_size=p.batch_size,
            grad_accum=p.grad_accum,
            max_steps=p.max_steps,
            eval_every=p.eval_every,
            patience=p.patience if p.early_stopping != "none" else 0,
            seed=self.ctx.seed,
            max_train_examples=auto["max_train_examples"],
            lora=p.lora,
            lora_r=p.lora_r,
            lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            progress=self.ctx.progress,
        )

    def _examples(self, data: TrainData, cap: int | None):
        n = self.params.history_len
        pairs = cap_examples(sequence_examples(data.train, history_len=n), cap, seed=self.ctx.seed)
        hists = [history_texts(self.texts, data.train[u][:t], n) for u, t in pairs]
        targets = [self.texts[int(data.train[u][t])] for u, t in pairs]
        return encode_examples(self.llm, self.template, hists, targets)

    def _valid_rows(self, data: TrainData, n_users: int | None) -> np.ndarray:
        rows = np.array([r for r in range(len(data.valid)) if len(data.valid.histories[r]) > 0], dtype=np.int64)
        if n_users is not None and n_users < len(rows):
            rows = np.sort(self.ctx.rng(17).choice(rows, size=n_users, replace=False))
        return rows

    # -- Method API ------------------------------------------------------------------------------
    def fit(self, data: TrainData) -> None:
        with cpu_threads(self.params.num_threads):
            self._fit(data)

    def _fit(self, data: TrainData) -> None:
        p = self.params
        self.template = get_template(p.prompt)
        self.llm = self._load()
        self.texts = catalog_texts(data.catalog, p.item_text)
        config = self.train_config(self.llm.device)
        examples = self._examples(data, config.max_train_examples)
        self.n_train = len(examples)
        self._build_trie()

        validate = None
        rows = self._valid_rows(data, p.resolved(self.llm.device)["valid_users"])
        if self._single_validation(config, len(examples)):
            rows = rows[:0]  # one validation at the very end selects nothing: save its cost
        if p.early_stopping == "loss" and len(rows):
            valid = data.valid
            hists = [history_texts(self.texts, valid.histories[r], p.history_len) for r in rows]
            targets = [self.texts[int(valid.targets[r])] for r in rows]
            validate = loss_validator(encode_examples(self.llm, self.template, hists, targets), self.llm.pad_id,
                                      batch_size=max(p.eval_batch_size, 8))
        elif p.early_stopping == "ndcg" and len(rows):
            valid = data.valid
            request = RankRequest(
                users=valid.users[rows],
                histories=[valid.histories[r] for r in rows],
                candidates=CandidateSet("full", valid.users[rows]),
                k=10,
                stage="valid",
            )

            def validate(model: Any) -> float:
                ranked = self._rank_trie(model, request, progress=False)
                scores = self.ctx.validate(ranked)
                return float(scores.get("ndcg@10", next(iter(scores.values()))))

        model = prepare_model(self.llm.model, config)
        extra = f"{self.llm.path}|{p.item_text}|{p.prompt}|{p.history_len}|{data.fingerprint}|{p.early_stopping}"
        work = training_dir(self.ctx, self.name or "sft", p, self.inference_fields(), f"{extra}|{len(rows)}")
        model, self.result = train(
            model, examples, config, pad_id=self.llm.pad_id, validate=validate, work_dir=work,
            fingerprint_extra=extra, **self.train_hooks(),
        )
        self.llm.model = merge_for_inference(model)
        self.item_embeddings = None  # embeddings belong to the trained weights
        self.ctx.notes["sft"] = {
            "train_examples": self.n_train,
            "steps": self.result.steps,
            "best_step": self.result.best_step,
            "best_score": self.result.best_score,
            "stopped_early": self.result.stopped_early,
            "resumed_from": self.result.resumed_from,
            "train_seconds": round(self.result.total_seconds, 2),
        }
        if self.result.loaded_only:
            self.ctx.notes["sft"]["loaded_from"] = str(work)  # a finished checkpoint, only loaded

    @staticmethod
    def _single_validation(config: TrainConfig, n_examples: int) -> bool:
        steps_per_epoch = max(1, math.ceil(math.ceil(n_examples / config.batch_size) / config.grad_accum))
        total = config.max_steps or steps_per_epoch * config.epochs
        return total <= (config.eval_every or steps_per_epoch)

    def inference_fields(self) -> tuple[str, ...]:
        """Hyperparameters that do not change the trained weights (checkpoints are shared across them)."""
        fields = ("grounding", "max_new_tokens", "eval_batch_size", "num_threads")
        return fields if self.params.early_stopping == "ndcg" else fields + ("num_beams",)

    def train_hooks(self) -> dict[str, Any]:
        """Overrides of the training objective (batching, loss); SFT uses the defaults."""
        return {}

    def _build_trie(self) -> None:
        from benchmark.llm.decoding import ItemTrie

        self.trie = ItemTrie.build(response_ids_batch(self.llm, self.texts), self.llm.eos_id, device=self.llm.device)

    def _prompts(self, request: RankRequest) -> list[list[int]]:
        hists = [history_texts(self.texts, h, self.params.history_len) for h in request.histories]
        return prompt_ids_batch(self.llm, self.template, hists)

    def _num_beams(self) -> int:
        return int(self.params.resolved(self.llm.device)["num_beams"])

    def rank(self, request: RankRequest) -> RankedLists:
        with cpu_threads(self.params.num_threads):
            return self._rank(request)

    def _rank(self, request: RankRequest) -> RankedLists:
        if self.llm is None:
            raise ConfigError("sft: rank() called before fit()")
        grounding = self.params.grounding
        if grounding == "trie":
            ranked = self._rank_trie(self.llm.model, request, progress=self.ctx.progress)
        else:
            ranked = self._rank_free(request, grounding)
        nb = self._num_beams()
        info = {
            "grounding": grounding,
            "num_beams": nb,
            "llm": self.llm.name,
            "train_examples": self.n_train,
            "item_text": self.params.item_text,
            "leaderboard_note": f"{self.llm.name}, {self.n_train} training examples, {grounding} grounding"
                                + (f", {nb} beams" if grounding == "trie" else ""),
        }
        short = int((ranked.items == PAD).any(axis=1).sum())
        if short:
            info["note"] = (
                f"{short} of {len(ranked.users)} users got fewer than k={request.k} items "
                f"(num_beams={nb}); their lists are PAD-filled"
            )
        ranked.info.update(info)
        return ranked

    def _rank_trie(self, model: Any, request: RankRequest, progress: bool) -> RankedLists:
        from benchmark.llm.decoding import constrained_beam_search

        k = request.k
        results = constrained_beam_search(
            model,
            self._prompts(request),
            self.trie,
            num_beams=self._num_beams(),
            k=k,
            exclude=exclusions(request, len(self.texts)),
            pad_id=self.llm.pad_id,
            batch_size=self.params.eval_batch_size,
            progress=progress,
        )
        n = len(request.users)
        items = np.full((n, k), PAD, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float64)
        for row, pairs in enumerate(results):
            for col, (item, score) in enumerate(pairs[:k]):
                items[row, col] = item
                scores[row, col] = score
        return RankedLists(
            users=np.asarray(request.users).copy(), items=items, scores=scores, extras={"valid": np.ones(n)}
        )

    def _item_embeddings(self) -> torch.Tensor:
        from benchmark.llm.decoding import embed_token_ids

        if self.item_embeddings is None:
            self.item_embeddings = embed_token_ids(
                self.llm.model, response_ids_batch(self.llm, self.texts), pooling="last", pad_id=self.llm.pad_id,
                batch_size=max(self.params.eval_batch_size, 32), progress=self.ctx.progress,
            )
        return self.item_embeddings

    def _rank_free(self, request: RankRequest, grounding: str) -> RankedLists:
        from benchmark.grounding import ground_exact, ground_l2, normalize_text, title_index
        from benchmark.llm.decoding import embed_token_ids, generate_free

        llm, k = self.llm, request.k
        beams = generate_free(
            llm.model, self._prompts(request), max_new_tokens=self.params.max_new_tokens,
            num_beams=self._num_beams(), pad_id=llm.pad_id, eos_id=llm.eos_id,
            batch_size=self.params.eval_batch_size, progress=self.ctx.progress,
        )
        exclude = exclusions(request, len(self.texts))
        decoded = [[llm.tokenizer.decode(b, skip_special_tokens=True).strip() for b in user] for user in beams]
        index = title_index(self.texts)
        valid = np.array([1.0 if user and normalize_text(user[0]) in index else 0.0 for user in decoded])
        if grounding == "l2":
            top = [user[0] if user and len(user[0]) else [llm.eos_id] for user in beams]
            gen = embed_token_ids(llm.model, top, pooling="last", pad_id=llm.pad_id,
                                  batch_size=max(self.params.eval_batch_size, 32), progress=False)
            ranked_ids = ground_l2(gen, self._item_embeddings(), k=k, exclude=exclude)
        else:
            ranked_ids, _ = ground_exact(decoded, index, k=k, exclude=exclude)
        n = len(request.users)
        items = np.full((n, k), PAD, dtype=np.int64)
        for row, ids in enumerate(ranked_ids):
            ids = np.asarray(ids, dtype=np.int64)[:k]
            items[row, : len(ids)] = ids
        return RankedLists(users=np.asarray(request.users).copy(), items=items, extras={"valid": valid})
