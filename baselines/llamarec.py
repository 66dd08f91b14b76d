"""LlamaRec: a sequential retriever's top-K reranked by an LLM through a verbalizer.

Yue et al. 2023, "LlamaRec: Two-Stage Recommendation using Large Language Models for
Ranking"; implemented from the paper and the reference code (Yueeeeeeee/LlamaRec:
`dataloader/llm.py`, `config.py`), nothing copied.

- Stage 1: a retriever (SASRec with full cross-entropy by default; `llamarec.retriever=NAME`
  takes any registered classic method) is fitted on the same training data with the same
  seed and `--set` overrides (`ctx.method_loader`): in a run with `--methods sasrec,llamarec`
  it is the very model scored on its own. Its top-K (K=20; seen items removed) are each
  user's candidates.
- Stage 2: the prompt lists the user's last N items (chronological, numbered "(1) title")
  and the K candidates under index letters "(A) title"; one forward pass reads the logits of
  the K letter tokens at the answer position (`benchmark.llm.verbalizer`): those are the
  scores. Titles are cut to 32 tokens (reference `llm_max_title_len`).
- Training: one example per position of each training sequence; candidates are the target
  plus K-1 random items the user has not interacted with before the target, shuffled
  (seeded per example); loss = cross-entropy on the answer letter and eos (the reference
  labels exactly those two tokens); LoRA r=8, alpha=32, dropout 0.05 on q_proj/v_proj,
  lr 1e-4, one epoch (the reference's defaults). Early stopping on validation NDCG@10 of
  the reranked lists, over validation users whose target the retriever retrieved (as the
  reference does).
- Evaluation: candidates in retriever order by default (`test_order=retriever`, the
  reference's); `test_order=shuffled` presents them in a seeded random order to remove the
  position cue. The final list is the LLM's order of the K followed by the retriever's next
  items up to k, so a target outside the K is a miss at every cutoff <= K. The runner
  reports the retrieval hit rate, the metrics on the retrieved subset and overall, and the
  retriever's own metrics on the same users (`two_stage` in metrics.json).

CPU budget ("auto"): 128 training examples, history of 10 items, no mid-epoch validation
(a CPU run of ML-100K with 100 test users takes ~15 minutes, bench/RESULTS.md); on CUDA
every example, history 20 (the reference's), validation every 200 steps on 512 users.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, is_dataclass
from typing import Any

import numpy as np
import torch

from baselines.sft import _auto_int, cpu_threads
from benchmark.config import params_key
from benchmark.errors import ConfigError
from benchmark.llm.loading import LLM, load_llm, resolve_device
from benchmark.llm.prompts import IGNORE, ITEM_TEXT_STYLES, PromptTemplate, catalog_texts, prompt_frame
from benchmark.llm.training import (
    TrainConfig,
    TrainResult,
    cap_examples,
    merge_for_inference,
    prepare_model,
    train,
    training_dir,
)
from benchmark.llm.verbalizer import index_labels, label_token_ids, verbalizer_scores
from benchmark.registry import Method, get_method, register_method
from benchmark.types import PAD, CandidateSet, RankedLists, RankRequest, TrainData

SYSTEM = "Given user history in chronological order, recommend an item from the candidate pool with its index letter."
TEST_ORDERS = ("retriever", "shuffled")


@dataclass
class LlamaRecParams:
    """Hyperparameters; defaults are the reference code's unless noted (CPU "auto" budgets)."""

    llm: str | None = None  # None: --llm (ctx.llm), else the bundled SmolLM2-135M-Instruct
    dtype: str = "auto"
    retriever: str = "sasrec"  # any registered classic method with rank(); fitted with the same seed
    k: int = 20  # candidates reranked (index letters A..)
    history_len: str = "auto"  # items in the prompt: auto = 20 on CUDA (reference), 10 on CPU
    title_tokens: int = 32  # tokens kept of each title (reference llm_max_title_len)
    item_text: str = "title_year"
    test_order: str = "retriever"  # "retriever" (reference) | "shuffled"
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,v_proj"
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    max_train_examples: str = "auto"  # auto = 128 on CPU, all on CUDA
    early_stopping: str = "ndcg"  # "ndcg" | "none"
    valid_users: str = "auto"  # auto = 32 on CPU, 512 on CUDA (users whose target was retrieved)
    eval_every: str = "auto"  # optimizer steps between validations: auto = 200 on CUDA, once per epoch on CPU
    patience: int = 3
    eval_batch_size: int = 8
    num_threads: int = 0  # torch CPU threads during fit/rank; 0 leaves torch's setting

    def __post_init__(self) -> None:
        if self.test_order not in TEST_ORDERS:
            raise ValueError(f"test_order must be one of {', '.join(TEST_ORDERS)}, got {self.test_order!r}")
        if self.early_stopping not in ("ndcg", "none"):
            raise ValueError(f"early_stopping must be ndcg or none, got {self.early_stopping!r}")
        if self.item_text not in ITEM_TEXT_STYLES:
            raise ValueError(f"item_text must be one of {', '.join(ITEM_TEXT_STYLES)}, got {self.item_text!r}")
        index_labels(self.k)  # 1..26
        if self.title_tokens < 1:
            raise ValueError("title_tokens must be at least 1")

    def resolved(self, device: torch.device) -> dict[str, int | None]:
        gpu = device.type == "cuda"
        def auto(field: str, value: int | None, allow_all: bool = False) -> int | None:
            return _auto_int(getattr(self, field), field, value, allow_all=allow_all, method="llamarec")

        return {
            "max_train_examples": auto("max_train_examples", None if gpu else 128, allow_all=True),
            "history_len": auto("history_len", 20 if gpu else 10),
            "valid_users": auto("valid_users", 512 if gpu else 32, allow_all=True),
            "eval_every": auto("eval_every", 200 if gpu else None) or 0,  # 0: once per epoch
        }


def negatives_for(rng: np.random.Generator, n_items: int, forbidden: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct items outside `forbidden` (uniform, seeded)."""
    allowed = np.setdiff1d(np.arange(n_items, dtype=np.int64), forbidden)
    if len(allowed) < count:
        raise ConfigError(f"llamarec.k={count + 1} needs at least {count} unseen items per user; lower llamarec.k")
    return rng.choice(allowed, size=count, replace=False)


@register_method("llamarec")
class LlamaRec(Method):
    """Two-stage: the retriever's top-K, reranked by the LLM's index-letter logits."""

    Params = LlamaRecParams
    uses_llm = True

    @classmethod
    def check_params(cls, params: LlamaRecParams) -> None:
        retriever = get_method(params.retriever)  # unknown names fail before any work
        if getattr(retriever, "uses_llm", False):
            raise ConfigError(f"llamarec.retriever={params.retriever!r} is an LLM method; use a classic one (e.g. sasrec)")

    def __init__(self, params: LlamaRecParams, ctx):
        super().__init__(params, ctx)
        self.llm: LLM | None = None
        self.retriever: Any = None
        self.texts: list[str] = []
        self.letter_ids: list[int] = []
        self.result: TrainResult | None = None
        self.n_train = 0

    # -- prompts --------------------------------------------------------------------------------
    def _frame(self) -> tuple[str, str, bool]:
        return prompt_frame(self.llm, PromptTemplate(system=SYSTEM, instruction=""))

    def prompt_text(self, history: np.ndarray, candidates: np.ndarray) -> str:
        """The reference layout: numbered history, then candidates under index letters."""
        before, after, _ = self._frame()
        hist = " \n ".join(f"({i + 1}) {self.texts[int(item)]}" for i, item in enumerate(history))
        letters = index_labels(len(candidates))
        cands = " \n ".join(f"({letter}) {self.texts[int(item)]}" for letter, item in zip(letters, candidates))
        message = f"User history: {hist}; \n Candidate pool: {cands}"
        if "{input}" in after:  # plain (non-chat) layout
            return before + SYSTEM + after.replace("{input}", f"### Input:\n{message}\n\n")
        return before + message + after

    def encode_prompts(self, histories: list[np.ndarray], candidates: list[np.ndarray]) -> list[list[int]]:
        _, _, add_special = self._frame()
        n = self._history_len()
        texts = [self.prompt_text(np.asarray(h)[-n:], c) for h, c in zip(histories, candidates)]
        return [list(ids) for ids in self.llm.tokenizer(texts, add_special_tokens=add_special)["input_ids"]]

    def _history_len(self) -> int:
        return int(self.params.resolved(self.llm.device)["history_len"])

    def _truncated_texts(self, data: TrainData) -> list[str]:
        texts = catalog_texts(data.catalog, self.params.item_text)
        tok = self.llm.tokenizer
        limit = self.params.title_tokens
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [t if len(i) <= limit else tok.decode(i[:limit]).strip() for t, i in zip(texts, ids)]

    # -- data -------------------------------------------------------------------------------------
    def training_examples(self, data: TrainData, cap: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, labels): the prompt with the target among K-1 sampled negatives, answered by its letter + eos."""
        k = self.params.k
        pairs = [(u, t) for u, seq in enumerate(data.train) for t in range(1, len(seq))]
        pairs = cap_examples(pairs, cap, seed=self.ctx.seed)
        histories, cand_lists, answers = [], [], []
        for index, (u, t) in enumerate(pairs):
            seq = data.train[u]
            rng = np.random.default_rng([self.ctx.seed, 7, index])
            target = int(seq[t])
            negatives = negatives_for(rng, data.n_items, np.append(seq[:t], target), k - 1)
            cands = rng.permutation(np.append(negatives, target))
            histories.append(seq[:t])
            cand_lists.append(cands)
            answers.append(int(np.flatnonzero(cands == target)[0]))
        prompts = self.encode_prompts(histories, cand_lists)
        out = []
        for prompt, answer in zip(prompts, answers):
            response = [self.letter_ids[answer], self.llm.eos_id]
            ids = np.asarray(prompt + response, dtype=np.int32)
            labels = np.asarray([IGNORE] * len(prompt) + response, dtype=np.int32)
            out.append((ids, labels))
        return out

    # -- stage 1 ------------------------------------------------------------------------------------
    def _load_retriever(self) -> Any:
        if self.ctx.method_loader is None:
            raise ConfigError("llamarec needs the runner's method loader to fit its retriever (run it via the runner)")
        retriever = self.ctx.method_loader(self.params.retriever)
        if not callable(getattr(retriever, "rank", None)):
            raise ConfigError(f"llamarec.retriever={self.params.retriever!r} cannot rank items")
        return retriever

    def retrieve(self, users: np.ndarray, histories: list[np.ndarray], candidates: CandidateSet, k: int,
                 stage: str = "test") -> RankedLists:
        request = RankRequest(users=np.asarray(users), histories=list(histories), candidates=candidates, k=k,
                              stage=stage)
        return self.retriever.rank(request)

    # -- Method API ---------------------------------------------------------------------------------
    def fit(self, data: TrainData) -> None:
        with cpu_threads(self.params.num_threads):
            self._fit(data)

    def _fit(self, data: TrainData) -> None:
        p = self.params
        self.retriever = self._load_retriever()
        self.llm = load_llm(p.llm or self.ctx.llm, dtype=p.dtype, device=resolve_device(self.ctx.device or "auto"))
        self.letter_ids = label_token_ids(self.llm, index_labels(p.k))
        self.texts = self._truncated_texts(data)
        auto = p.resolved(self.llm.device)
        config = TrainConfig(
            lr=p.lr, epochs=p.epochs, batch_size=p.batch_size, grad_accum=p.grad_accum, max_steps=p.max_steps,
            eval_every=int(auto["eval_every"] or 0), patience=p.patience if p.early_stopping != "none" else 0,
            seed=self.ctx.seed, max_train_examples=auto["max_train_examples"], lora=p.lora, lora_r=p.lora_r,
            lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
            lora_targets=tuple(t.strip() for t in p.lora_targets.split(",") if t.strip()),
            progress=self.ctx.progress,
        )
        examples = self.training_examples(data, config.max_train_examples)
        self.n_train = len(examples)
        validate = self._validator(data, auto["valid_users"], config, len(examples))
        model = prepare_model(self.llm.model, config)
        extra = (f"llamarec|{self.llm.path}|{p.item_text}|{auto['history_len']}|{p.k}|{p.title_tokens}|"
                 f"{p.retriever}|{data.fingerprint}")
        # the retriever's settings shape validation (which users, which candidates), so they key training too
        retriever_params = getattr(self.retriever, "params", None)
        key_extra = f"{extra}|{getattr(validate, 'n_users', 0)}|" + (
            json.dumps(params_key(retriever_params), sort_keys=True, default=str) if is_dataclass(retriever_params) else "")
        work = training_dir(self.ctx, "llamarec", p, ("test_order", "eval_batch_size", "num_threads"), key_extra)
        model, self.result = train(model, examples, config, pad_id=self.llm.pad_id, work_dir=work,
                                   validate=validate, fingerprint_extra=extra)
        self.llm.model = merge_for_inference(model)
        self.ctx.notes["llamarec"] = {
            "retriever": p.retriever,
            "train_examples": self.n_train,
            "train_tokens": int(sum(len(ids) for ids, _ in examples)),
            "steps": self.result.steps,
            "best_step": self.result.best_step,
            "best_valid_ndcg@10": self.result.best_score,
            "valid_users": 0 if validate is None else int(getattr(validate, "n_users", 0)),
            "train_seconds": round(self.result.total_seconds, 2),
            "history_len": auto["history_len"],
        }
        if self.result.loaded_only:
            self.ctx.notes["llamarec"]["loaded_from"] = str(work)  # a finished checkpoint, only loaded

    def _validator(self, data: TrainData, n_users: int | None, config: TrainConfig, n_examples: int):
        """Validation NDCG@10 of the reranked top-K over validation users whose target was retrieved."""
        if self.params.early_stopping == "none":
            return None
        steps_per_epoch = max(1, math.ceil(math.ceil(n_examples / config.batch_size) / config.grad_accum))
        total = config.max_steps or steps_per_epoch * config.epochs
        if total <= (config.eval_every or steps_per_epoch):
            return None  # one validation at the very end would select nothing
        valid = data.valid
        rows = np.array([r for r in range(len(valid)) if len(valid.histories[r])], dtype=np.int64)
        first = self.retrieve(valid.users[rows], [valid.histories[r] for r in rows],
                              CandidateSet("full", valid.users[rows]), self.params.k, stage="valid")
        hit = (first.items == valid.targets[rows][:, None]).any(axis=1)
        rows, top = rows[hit], first.items[hit]
        if n_users is not None and n_users < len(rows):
            keep = np.sort(self.ctx.rng(17).choice(len(rows), size=n_users, replace=False))
            rows, top = rows[keep], top[keep]
        if not len(rows):
            return None
        users = valid.users[rows]
        histories = [valid.histories[r] for r in rows]

        def validate(model: Any) -> float:
            items, _ = self._rerank(model, histories, top, progress=False)
            ranked = RankedLists(users=users.copy(), items=items)
            return float(self.ctx.validate(ranked)["ndcg@10"])

        validate.n_users = len(rows)  # type: ignore[attr-defined]
        return validate

    def _rerank(self, model: Any, histories: list[np.ndarray], top: np.ndarray, progress: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        """Reorder each row of `top` (PAD-filled) by the verbalizer; returns (items, scores)."""
        n, k = top.shape
        counts = (top != PAD).sum(axis=1)
        cand_lists = [top[r, : counts[r]] for r in range(n)]
        prompts = self.encode_prompts(histories, cand_lists)
        ids = [self.letter_ids[: max(int(c), 1)] + [self.letter_ids[0]] * (k - max(int(c), 1)) for c in counts]
        scores = verbalizer_scores(model, prompts, ids, pad_id=self.llm.pad_id, batch_size=self.params.eval_batch_size,
                                   progress=progress)
        items = np.full((n, k), PAD, dtype=np.int64)
        out_scores = np.full((n, k), -np.inf, dtype=np.float64)
        for r in range(n):
            c = int(counts[r])
            order = np.argsort(-scores[r, :c], kind="stable")  # ties keep the presented order
            items[r, :c] = cand_lists[r][order]
            out_scores[r, :c] = scores[r, :c][order]
        return items, out_scores

    def rank(self, request: RankRequest) -> RankedLists:
        with cpu_threads(self.params.num_threads):
            return self._rank(request)

    def _rank(self, request: RankRequest) -> RankedLists:
        if self.llm is None:
            raise ConfigError("llamarec: rank() called before fit()")
        p = self.params
        width = max(p.k, request.k)
        first = self.retrieve(request.users, request.histories, request.candidates, width)
        order = {int(u): i for i, u in enumerate(first.users)}
        first_items = np.asarray(first.items, dtype=np.int64)[[order[int(u)] for u in request.users]]
        top = first_items[:, : p.k].copy()
        if p.test_order == "shuffled":
            for r in range(len(top)):
                c = int((top[r] != PAD).sum())
                top[r, :c] = np.random.default_rng([self.ctx.seed, 11, int(request.users[r])]).permutation(top[r, :c])
        items, _ = self._rerank(self.llm.model, list(request.histories), top, progress=self.ctx.progress)
        # the LLM's order of the K, then the retriever's next items; scores are the verbalizer
        # logits of the K (the tail's retriever scores are on another scale, so no scores are stored)
        final = np.concatenate([items, first_items[:, p.k :]], axis=1)[:, : request.k]
        stage1 = RankedLists(users=np.asarray(request.users).copy(), items=first_items,
                             info={"method": p.retriever, "k": p.k})
        info = {"retriever": p.retriever, "k": p.k, "test_order": p.test_order, "llm": self.llm.name,
                "train_examples": self.n_train, "history_len": self._history_len(),
                "leaderboard_note": f"{self.llm.name} reranks the {p.retriever} top-{p.k} ({p.test_order} order), "
                                    f"{self.n_train} training examples"}
        return RankedLists(users=np.asarray(request.users).copy(), items=final, info=info, first_stage=stage1)
