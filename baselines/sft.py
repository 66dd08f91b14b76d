"""SFT: supervised fine-tuning of an LLM to name the next item, as CFT's recipe without CFT's loss.

The generative next-item paradigm of BIGRec (Bao et al. 2023): the LLM reads an instruction
and the user's last items as quoted titles and is fine-tuned to answer with the next item's
title; the answer is grounded to catalog items.

Recipe (version 2): the reference code of CFT (itsmeyjt/CFT @5bd1805, Zhang et al. 2024)
with its causal-effect loss switched off (alpha 0, no token weights), so that
`--methods cft,sft` changes exactly one thing, as the CFT paper compares them:
full fine-tuning in bf16, AdamW lr 1e-4 with 20 warmup steps then linear decay, batch 64
(micro-batch 16, accumulation 4), 3 epochs over every training example (every position
with up to 10 history items, the D3/BIGRec data format that CFT's code reads), loss on
the answer only, validation loss every epoch with patience 1 and the best epoch kept; then
5-beam generation (max 128 new tokens, at least 4, length penalty 1.0), each beam's text
embedded by the fine-tuned model (last token's last-layer state), every catalog item
ranked by L2 distance to each beam, and the per-beam rankings merged round-robin
(eval_acc_2.py). Every value, with its source, is declared in `SFTParams` and listed by
`python -m benchmark recipes sft`.

BIGRec's own recipe (LoRA on q/v, 1,024 windows of exactly 10 items, loss on prompt and
answer, top beam embedded by the base model) is the `bigrec` preset (`baselines/bigrec.py`).

Alternatives to the reference grounding (each named in the row's notes):
- ``grounding="trie"``: beam search constrained by a token trie of every catalog item's
  answer text (every answer is a real item; seen items pruned inside the search), items
  ranked by sequence log-probability;
- ``grounding="exact"``: free beams whose text equals a catalog item's text;
- ``grounding="likelihood"``: exact ranking, every catalog item by the full log-likelihood of
  its answer (`benchmark.llm.likelihood`); the yardstick of the beam search's error, costly
  on a CPU (minutes per user), so meant for a sample of users (`--eval-users`);
- ``l2_merge="top_beam"`` (BIGRec: only the best beam) or ``"min"`` (each item's smallest
  distance over beams); ``embed_model="base"`` (BIGRec: the untuned model embeds).
Rows shorter than k (trie or exact grounding with few beams) are filled with the most
popular unseen training items, and `info["filled"]` counts how many positions were filled.

Candidates: with a sampled or retrieved candidate set, every non-candidate item is added to
the user's exclusion list, so every grounding returns only candidates.
A rerun with the same training settings resumes from (or reuses) its checkpoint, kept in the
run store's model cache by a key of every training field (`training_dir`), so another
grounding, --eval-users or --candidates trains nothing new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from benchmark.errors import ConfigError
from benchmark.hparams import fields_with_role, hp
from benchmark.llm.fields import BUNDLED_LLM, LLMFields, TrainFields
from benchmark.llm.loading import LLM
from benchmark.llm.precision import PRECISIONS, cpu_threads, inference_precision
from benchmark.llm.prompts import (
    ITEM_TEXT_STYLES,
    TEMPLATES,
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
from benchmark.ranking import fill_by_popularity, popularity_order
from benchmark.recipes import Budget
from benchmark.registry import Method, register_method
from benchmark.types import PAD, CandidateSet, RankedLists, RankRequest, TrainData

GROUNDINGS = ("l2", "trie", "exact", "likelihood")
L2_MERGES = ("round_robin", "top_beam", "min")
CFT_CODE = "itsmeyjt/CFT@5bd1805"
D3 = "SAI990323/DecodingMatters"


@dataclass
class SFTParams(TrainFields, LLMFields):
    """CFT's recipe without CFT's loss; each value's source is given with it."""

    llm: str | None = hp(None, none=BUNDLED_LLM, reference="a Qwen-family LLM (size not stated)",
                         why="the bundled SmolLM2-135M-Instruct unless --llm names another",
                         source=f"{CFT_CODE} first commit: pad/eos id 151643 is Qwen's <|endoftext|> (baselines/sources/cft.md)")
    precision: str = hp("bf16", choices=PRECISIONS,
                        source=f"{CFT_CODE} train.py:190 torch_dtype=bfloat16, train.py:317 bf16=True")
    item_text: str = hp("title_year", choices=ITEM_TEXT_STYLES,
                        source="SAI990323/BIGRec data/movie/process.ipynb cell 0: MovieLens titles with the year")
    prompt: str = hp("bigrec", choices=tuple(TEMPLATES),
                     source=f"{CFT_CODE} train.py generate_prompt (Alpaca layout); instruction and history text: "
                            "BIGRec data/movie/process.ipynb cell 5 (CFT's data files are not released)")
    history_len: int = hp(10, ge=1, source=f"{D3} code/process.py:160 st = max(i - 10, 0)")
    min_history: int = hp(1, ge=1, source=f"{D3} code/process.py:159 every position i >= 1")
    train_positions: str = hp("all", choices=("all", "last"),
                              source=f"{D3} code/process.py:159 every position; last: each user's most recent "
                                     "training item only (a CPU budget point)")
    train_on_inputs: bool = hp(False, source=f"{CFT_CODE} run.sh:21 --train_on_inputs False")
    lora: bool = hp(False, source=f"{CFT_CODE} train.py: full fine-tuning (peft imported, LoRA never applied)")
    lora_r: int = hp(8, ge=1, source="used only with lora=true: BIGRec README --lora_r 8")
    lora_alpha: int = hp(16, ge=1, source="used only with lora=true: BIGRec README --lora_alpha 16")
    lora_dropout: float = hp(0.05, ge=0, lt=1, source="used only with lora=true: BIGRec README --lora_dropout 0.05")
    lora_targets: str = hp("q_proj,v_proj", source="used only with lora=true: BIGRec README --lora_target_modules")
    lr: float = hp(1e-4, gt=0, source=f"{CFT_CODE} run.sh:4 lr 1e-4")
    weight_decay: float = hp(0.0, ge=0, source=f"{CFT_CODE} train.py:308 TrainingArguments default weight_decay=0")
    max_grad_norm: float = hp(1.0, ge=0, source=f"{CFT_CODE} train.py:308 TrainingArguments default max_grad_norm=1")
    warmup_steps: int = hp(20, ge=0, source=f"{CFT_CODE} train.py:313 warmup_steps=20 (then linear decay, the default)")
    epochs: int = hp(3, ge=1, source=f"{CFT_CODE} run.sh:18 --num_epochs 3")
    batch_size: int = hp(16, ge=1, source=f"{CFT_CODE} run.sh:17 --micro_batch_size 16")
    grad_accum: int = hp(4, ge=1, source=f"{CFT_CODE} run.sh:16-17 batch 64 / micro-batch 16 (train.py:165)")
    max_train_examples: int | None = hp(None, ge=0, none="all",
                                        source=f"{CFT_CODE} run.sh:8 --sample -1 (all); 0 = no training (zero-shot)")
    early_stopping: str = hp("loss", choices=("loss", "ndcg", "none"),
                             source=f"{CFT_CODE} train.py:319 evaluation_strategy=epoch, load_best_model_at_end")
    valid_users: int | None = hp(None, ge=1, none="all", source=f"{CFT_CODE} train.py: the whole validation file")
    eval_every: int = hp(0, ge=0, source=f"{CFT_CODE} train.py:319 once per epoch (0)")
    patience: int = hp(1, ge=1, source=f"{CFT_CODE} train.py:331 EarlyStoppingCallback(early_stopping_patience=1)")
    grounding: str = hp("l2", choices=GROUNDINGS, role="infer",
                        source=f"{CFT_CODE} eval_acc_2.py:62-76 L2 distance of item embeddings to each beam's embedding")
    l2_merge: str = hp("round_robin", choices=L2_MERGES, role="infer",
                       source=f"{CFT_CODE} eval_acc_2.py:83-96 per-beam rankings interleaved, de-duplicated")
    embed_model: str = hp("tuned", choices=("tuned", "base"), role="infer",
                          source=f"{CFT_CODE} eval_acc_2.py:18 and embedding.py:11 embed with the fine-tuned model")
    num_beams: int = hp(5, ge=1, role="infer", source=f"{CFT_CODE} infer.py:77 num_beams=5, num_return_sequences=5")
    max_new_tokens: int = hp(128, ge=1, role="infer", source=f"{CFT_CODE} infer.py:79 max_new_tokens=128")
    min_new_tokens: int = hp(4, ge=0, role="infer", source=f"{CFT_CODE} infer.py:100 min_new_tokens=4")
    length_penalty: float = hp(1.0, role="infer", source=f"{CFT_CODE} infer.sh --length_penalty 1.0")
    eval_batch_size: int = hp(8, ge=1, role="harness")


# The CPU budget shared by SFT and CFT (so `cft` vs `sft` still differ only in CFT's loss).
CPU_BUDGET = Budget(
    reason="a 2-core CPU cannot train on every example (~97k on ML-100K, about 27 hours per epoch at the "
           "~275 training tokens/s of bench/RESULTS-llm.md) nor validate on every user each epoch; free generation "
           "stops at 40 new tokens because the longest MovieLens answer is 31-35 tokens and an untuned model runs "
           "to the limit (128 tokens: ~40 minutes more per 943 users)",
    changes={"max_train_examples": 2048, "epochs": 1, "valid_users": 256, "max_new_tokens": 40},
)


@register_method("sft")
class SFT(Method):
    """Fine-tune an LLM to generate the next item's text (CFT's recipe without its loss); ground to catalog ids."""

    Params = SFTParams
    uses_llm = True
    RECIPE_VERSION: ClassVar[int] = 2
    REFERENCE: ClassVar[str] = f"{CFT_CODE} with alpha=0 and no token weights (Zhang et al. 2024, arXiv 2410.22809)"
    BUDGETS: ClassVar[dict[str, Budget]] = {"cpu": CPU_BUDGET}

    def __init__(self, params: SFTParams, ctx):
        super().__init__(params, ctx)
        self.llm: LLM | None = None
        self.texts: list[str] = []
        self.trie = None
        self._item_embeddings: dict[str, torch.Tensor] = {}
        self.result: TrainResult | None = None
        self.n_train = 0
        self.popular: np.ndarray = np.zeros(0, dtype=np.int64)

    # -- setup ---------------------------------------------------------------------------------
    def _load(self) -> LLM:
        return self.params.load_model(self.ctx)

    def train_config(self) -> TrainConfig:
        return self.params.train_config(seed=self.ctx.seed, precision=self.params.precision,
                                        progress=self.ctx.progress)

    def _pairs(self, data: TrainData, cap: int | None) -> list[tuple[int, int]]:
        p = self.params
        pairs = sequence_examples(data.train, history_len=p.history_len, min_history=p.min_history)
        if p.train_positions == "last":  # each user's most recent training item only
            last = {u: t for u, t in pairs}
            pairs = sorted(last.items())
        return cap_examples(pairs, cap, seed=self.ctx.seed)

    def _examples(self, data: TrainData, cap: int | None):
        n = self.params.history_len
        pairs = self._pairs(data, cap)
        hists = [history_texts(self.texts, data.train[u][:t], n) for u, t in pairs]
        targets = [self.texts[int(data.train[u][t])] for u, t in pairs]
        return encode_examples(self.llm, self.template, hists, targets, train_on_inputs=self.params.train_on_inputs)

    def _valid_rows(self, data: TrainData, n_users: int | None) -> np.ndarray:
        rows = np.array([r for r in range(len(data.valid)) if len(data.valid.histories[r]) > 0], dtype=np.int64)
        if n_users is not None and n_users < len(rows):
            rows = np.sort(self.ctx.rng(17).choice(rows, size=n_users, replace=False))
        return rows

    def _loss_validator(self, data: TrainData, rows: np.ndarray):
        p, valid = self.params, data.valid
        hists = [history_texts(self.texts, valid.histories[r], p.history_len) for r in rows]
        targets = [self.texts[int(valid.targets[r])] for r in rows]
        return loss_validator(
            encode_examples(self.llm, self.template, hists, targets, train_on_inputs=p.train_on_inputs),
            self.llm.pad_id, batch_size=max(p.eval_batch_size, 8), precision=p.precision,
            token_weights=self.validation_weights(),
        )

    def validation_weights(self):
        """Token weights of the validation loss (None: the plain token mean); CFT weighs it."""
        return None

    # -- Method API ------------------------------------------------------------------------------
    def fit(self, data: TrainData) -> None:
        with cpu_threads(self.params.num_threads):
            self._fit(data)

    def _fit(self, data: TrainData) -> None:
        p = self.params
        self.template = get_template(p.prompt)
        self.llm = self._load()
        self.texts = catalog_texts(data.catalog, p.item_text)
        self.popular = popularity_order(data.train, data.n_items)
        config = self.train_config()
        examples = self._examples(data, config.max_train_examples) if config.max_train_examples != 0 else []
        self.n_train = len(examples)
        if p.grounding == "trie" or p.early_stopping == "ndcg":
            self._build_trie()

        # the validation loss on `valid_users` is always reported (after training, and before it for the
        # zero-shot point); it selects the best epoch when more than one validation runs
        all_rows = self._valid_rows(data, p.valid_users)
        valid_loss = self._loss_validator(data, all_rows) if len(all_rows) else None
        if not examples:  # the zero-shot point: the model as loaded
            self.llm.model = merge_for_inference(self.llm.model, p.precision)
            self.ctx.notes["sft"] = {"train_examples": 0, "steps": 0, "train_seconds": 0.0, "precision": p.precision,
                                     "valid_loss": None if valid_loss is None else -valid_loss(self.llm.model)}
            return
        validate = None
        rows = all_rows[:0] if self._single_validation(config, len(examples)) else all_rows
        if p.early_stopping == "loss" and len(rows):
            validate = valid_loss
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
                with inference_precision(model):
                    ranked = self._rank_trie(model, request, progress=False)
                scores = self.ctx.validate(ranked)
                return float(scores.get("ndcg@10", next(iter(scores.values()))))

        model = prepare_model(self.llm.model, config)
        extra = f"{self.llm.path}|{data.fingerprint}|{len(rows)}"
        work = training_dir(self.ctx, self.name or "sft", p, fields_with_role(p, "infer", "harness"), extra)
        model, self.result = train(
            model, examples, config, pad_id=self.llm.pad_id, validate=validate, work_dir=work,
            fingerprint_extra=extra, **self.train_hooks(),
        )
        final_loss = None if valid_loss is None else -valid_loss(model)
        self.llm.model = merge_for_inference(model, p.precision)
        self._item_embeddings = {}  # embeddings belong to the trained weights
        self.ctx.notes["sft"] = {
            "valid_loss": final_loss,
            "train_examples": self.n_train,
            "train_tokens": self.result.total_tokens,
            "steps": self.result.steps,
            "best_step": self.result.best_step,
            "best_score": self.result.best_score,
            "history": self.result.history,
            "stopped_early": self.result.stopped_early,
            "resumed_from": self.result.resumed_from,
            "train_seconds": round(self.result.total_seconds, 2),
            "prior_train_seconds": round(self.result.prior_seconds, 2),  # of attempts before a resume
            "precision": p.precision,
        }
        if self.result.loaded_only:
            self.ctx.notes["sft"]["loaded_from"] = str(work)  # a finished checkpoint, only loaded

    @staticmethod
    def _single_validation(config: TrainConfig, n_examples: int) -> bool:
        steps_per_epoch = max(1, math.ceil(math.ceil(n_examples / config.batch_size) / config.grad_accum))
        total = config.max_steps or steps_per_epoch * config.epochs
        return total <= (config.eval_every or steps_per_epoch)

    def train_hooks(self) -> dict[str, Any]:
        """Overrides of the training objective (batching, loss); SFT uses the defaults."""
        return {}

    def _build_trie(self) -> None:
        from benchmark.llm.decoding import ItemTrie

        self.trie = ItemTrie.build(self.answers(), self.llm.eos_id, device=self.llm.device)

    def _prompts(self, request: RankRequest) -> list[list[int]]:
        hists = [history_texts(self.texts, h, self.params.history_len) for h in request.histories]
        return prompt_ids_batch(self.llm, self.template, hists)

    def rank(self, request: RankRequest) -> RankedLists:
        if self.llm is None:
            raise ConfigError(f"{self.name}: rank() called before fit()")
        with cpu_threads(self.params.num_threads), inference_precision(self.llm.model):
            return self._rank(request)

    def _rank(self, request: RankRequest) -> RankedLists:
        p = self.params
        if p.grounding == "trie":
            ranked = self._rank_trie(self.llm.model, request, progress=self.ctx.progress)
        elif p.grounding == "likelihood":
            ranked = self._rank_likelihood(request)
        else:
            ranked = self._rank_free(request)
        exclude = exclusions(request, len(self.texts))
        filled = np.zeros(len(ranked.users))
        for row in range(len(ranked.users)):
            ranked.items[row], filled[row] = fill_by_popularity(ranked.items[row], self.popular, exclude[row])
        ranked.extras["filled"] = filled
        grounding = {"l2": f"L2 grounding ({p.embed_model} model, {p.l2_merge} over {p.num_beams} beams)",
                     "trie": f"trie-constrained beam search ({p.num_beams} beams)",
                     "exact": f"exact-title grounding of {p.num_beams} free beams",
                     "likelihood": "exact ranking by every item's full likelihood"}[p.grounding]
        info = {
            "grounding": p.grounding,
            "num_beams": p.num_beams,
            "llm": self.llm.name,
            "train_examples": self.n_train,
            "precision": p.precision,
            "leaderboard_note": f"{self.llm.name}, {self.n_train} training examples, {grounding}, {p.precision}",
        }
        info.update(self.ranking_info(ranked, request))
        ranked.info.update(info)
        return ranked

    def ranking_info(self, ranked: RankedLists, request: RankRequest) -> dict[str, Any]:
        """What the lists say about all ranked users (the runner recomputes it on merged shards)."""
        filled = np.asarray(ranked.extras["filled"])
        info: dict[str, Any] = {"filled_positions": int(filled.sum())}
        if filled.any():
            info["note"] = (f"{int((filled > 0).sum())} of {len(ranked.users)} users got fewer than k={request.k} "
                            f"items from {self.params.grounding} grounding; {int(filled.sum())} positions were "
                            "filled with the most popular unseen training items")
        return info

    def _rank_trie(self, model: Any, request: RankRequest, progress: bool) -> RankedLists:
        from benchmark.llm.decoding import constrained_beam_search

        k = request.k
        results = constrained_beam_search(
            model,
            self._prompts(request),
            self.trie,
            num_beams=self.params.num_beams,
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

    def answers(self) -> list[list[int]]:
        """Every catalog item's answer as token ids (no eos), as training and the trie use them."""
        return response_ids_batch(self.llm, [self.template.response(t) for t in self.texts])

    def _rank_likelihood(self, request: RankRequest) -> RankedLists:
        from tqdm.auto import tqdm

        from benchmark.llm.likelihood import item_log_likelihoods, rank_by_likelihood

        k, answers = request.k, self.answers()
        exclude = exclusions(request, len(self.texts))
        n = len(request.users)
        items = np.full((n, k), PAD, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float64)
        prompts = self._prompts(request)
        for row in tqdm(range(n), desc="exact ranking", disable=not self.ctx.progress):
            loglik = item_log_likelihoods(self.llm.model, prompts[row], answers, eos_id=self.llm.eos_id,
                                          pad_id=self.llm.pad_id)
            top, top_scores = rank_by_likelihood(loglik, exclude[row], k)
            items[row, : len(top)], scores[row, : len(top)] = top, top_scores
        return RankedLists(users=np.asarray(request.users).copy(), items=items, scores=scores,
                           extras={"valid": np.ones(n)})

    # -- free generation and grounding ---------------------------------------------------------
    def _embedder(self) -> Any:
        """The model that embeds texts for L2 grounding: the fine-tuned one, or the base model."""
        if self.params.embed_model == "tuned":
            return self.llm.model
        base = self._load()  # the untuned weights, as BIGRec's evaluate.py loads them
        return base.model

    def _embed_texts(self, model: Any, texts: list[str], progress: bool) -> torch.Tensor:
        from benchmark.llm.decoding import embed_token_ids

        ids = [x if x else [self.llm.eos_id] for x in response_ids_batch(self.llm, texts)]
        return embed_token_ids(model, ids, pooling="last", pad_id=self.llm.pad_id,
                               batch_size=max(self.params.eval_batch_size, 32), progress=progress)

    def item_embeddings(self, model: Any) -> torch.Tensor:
        key = self.params.embed_model
        if key not in self._item_embeddings:
            self._item_embeddings[key] = self._embed_texts(model, self.texts, self.ctx.progress)
        return self._item_embeddings[key]

    def _rank_free(self, request: RankRequest) -> RankedLists:
        from benchmark.grounding import ground_exact, ground_l2, normalize_text, title_index
        from benchmark.llm.decoding import generate_free

        p, llm, k = self.params, self.llm, request.k
        beams = generate_free(
            llm.model, self._prompts(request), max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
            num_beams=p.num_beams, pad_id=llm.pad_id, eos_id=llm.eos_id, length_penalty=p.length_penalty,
            batch_size=p.eval_batch_size, progress=self.ctx.progress,
        )
        exclude = exclusions(request, len(self.texts))
        decoded = [[self.template.strip_response(llm.tokenizer.decode(b, skip_special_tokens=True)) for b in user]
                   for user in beams]
        index = title_index(self.texts)
        valid = np.array([1.0 if user and normalize_text(user[0]) in index else 0.0 for user in decoded])
        if p.grounding == "l2":
            width = 1 if p.l2_merge == "top_beam" else p.num_beams
            texts = [(user + [""] * width)[:width] for user in decoded]  # a prompt may end with fewer beams
            model = self._embedder()
            gen = self._embed_texts(model, [t for user in texts for t in user], progress=False)
            gen = gen.reshape(len(texts), width, -1)
            merge = "min" if p.l2_merge == "min" else "round_robin"
            ranked_ids = ground_l2(gen, self.item_embeddings(model), k=k, exclude=exclude, merge=merge)
            if model is not llm.model:
                del model
        else:
            ranked_ids, _ = ground_exact(decoded, index, k=k, exclude=exclude)
        n = len(request.users)
        items = np.full((n, k), PAD, dtype=np.int64)
        for row, ids in enumerate(ranked_ids):
            ids = np.asarray(ids, dtype=np.int64)[:k]
            items[row, : len(ids)] = ids
        return RankedLists(users=np.asarray(request.users).copy(), items=items, extras={"valid": valid})


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
