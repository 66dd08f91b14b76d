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

Recipe (version 2): the reference code's values, each with its source in `LlamaRecParams`
(`python -m benchmark recipes llamarec`): history 20, micro-batch 16, warmup 100 steps,
validation every 100 steps with patience 20, every training prefix, 4-bit QLoRA on CUDA.
Permanent departures: the retriever is SASRec+ (`sasrec`), not LRURec; 4-bit loading needs
bitsandbytes (CUDA, `quantize=4bit`). The CPU budget trains on 1,024 examples and validates
on 128 retrieved users.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, is_dataclass
from typing import Any, ClassVar

import numpy as np

from benchmark.config import params_key
from benchmark.errors import ConfigError
from benchmark.hparams import fields_with_role, hp
from benchmark.llm.fields import BUNDLED_LLM, LLMFields, TrainFields
from benchmark.llm.loading import LLM
from benchmark.llm.precision import PRECISIONS, cpu_threads
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
from benchmark.recipes import Budget
from benchmark.registry import Method, get_method, register_method
from benchmark.types import PAD, CandidateSet, RankedLists, RankRequest, TrainData

ENCODE_CHUNK = 2048  # prompts tokenized per tokenizer call
SYSTEM = "Given user history in chronological order, recommend an item from the candidate pool with its index letter."
TEST_ORDERS = ("retriever", "shuffled")


LLAMAREC = "Yueeeeeeee/LlamaRec@48b288b"


@dataclass
class LlamaRecParams(TrainFields, LLMFields):
    """The reference code's values (config.py, trainer/llm.py, train_ranker.py), each with its source."""

    llm: str | None = hp(None, none=BUNDLED_LLM, reference="meta-llama/Llama-2-7b-hf",
                         why="the bundled SmolLM2-135M-Instruct unless --llm names another",
                         source=f"{LLAMAREC} config.py:122 llm_base_model")
    precision: str = hp("bf16", choices=PRECISIONS, source=f"{LLAMAREC} trainer/llm.py:105 bf16=True")
    quantize: str = hp("none", choices=("none", "4bit"), reference="4bit",
                       why="4-bit NF4 loading needs bitsandbytes on CUDA (set quantize=4bit there)",
                       source=f"{LLAMAREC} config.py:133 llm_load_in_4bit=True; train_ranker.py:36-49 NF4, "
                              "double quantization, prepare_model_for_kbit_training")
    retriever: str = hp("sasrec", reference="LRURec",
                        why="LRURec is not implemented here; the retriever is the strongest SASRec recipe (sasrec)",
                        source=f"{LLAMAREC} train_retriever.py (LRURec, model/lru.py)")
    k: int = hp(20, ge=1, le=26, source=f"{LLAMAREC} config.py:128 llm_negative_sample_size=19 (+1 positive)")
    history_len: int = hp(20, ge=1, source=f"{LLAMAREC} config.py:126 llm_max_history=20")
    title_tokens: int = hp(32, ge=1, source=f"{LLAMAREC} config.py:124 llm_max_title_len=32")
    item_text: str = hp("title_year", choices=ITEM_TEXT_STYLES,
                        source=f"{LLAMAREC} datasets/ml_100k.py: MovieLens titles with the year")
    test_order: str = hp("retriever", choices=TEST_ORDERS, role="infer",
                         source=f"{LLAMAREC} dataloader/llm.py:259 candidates in retriever order (shuffle commented out)")
    lora: bool = hp(True, source=f"{LLAMAREC} train_ranker.py:50 LoraConfig")
    lora_r: int = hp(8, ge=1, source=f"{LLAMAREC} config.py:140 lora_r=8")
    lora_alpha: int = hp(32, ge=1, source=f"{LLAMAREC} config.py:141 lora_alpha=32")
    lora_dropout: float = hp(0.05, ge=0, lt=1, source=f"{LLAMAREC} config.py:142 lora_dropout=0.05")
    lora_targets: str = hp("q_proj,v_proj", source=f"{LLAMAREC} config.py:143 lora_target_modules")
    lr: float = hp(1e-4, gt=0, source=f"{LLAMAREC} config.py:147 lora_lr=1e-4")
    weight_decay: float = hp(0.0, ge=0, source=f"{LLAMAREC} trainer/llm.py:99 TrainingArguments default 0 "
                                              "(paged_adamw_32bit; AdamW here)")
    max_grad_norm: float = hp(1.0, ge=0, source=f"{LLAMAREC} trainer/llm.py:99 TrainingArguments default 1")
    warmup_steps: int = hp(100, ge=0, source=f"{LLAMAREC} trainer/llm.py:102 warmup_steps (config.py:44: 100)")
    epochs: int = hp(1, ge=1, source=f"{LLAMAREC} config.py:144 lora_num_epochs=1")
    batch_size: int = hp(16, ge=1, source=f"{LLAMAREC} config.py:26-27 micro-batch 16 on ml-100k")
    grad_accum: int = hp(1, ge=1, source=f"{LLAMAREC} trainer/llm.py:101 train_batch_size // micro-batch = 16 // 16")
    max_train_examples: int | None = hp(None, ge=1, none="all",
                                        source=f"{LLAMAREC} dataloader/llm.py:209-210 every prefix of every user")
    early_stopping: str = hp("ndcg", choices=("ndcg", "none"),
                             source=f"{LLAMAREC} trainer/llm.py:119 metric_for_best_model=NDCG@10")
    valid_users: int | None = hp(None, ge=1, none="all retrieved",
                                 source=f"{LLAMAREC} dataloader/llm.py:118 every validation user whose target is "
                                        "in the retriever's top-20")
    eval_every: int = hp(100, ge=0, source=f"{LLAMAREC} config.py:145 lora_val_iterations=100")
    patience: int = hp(20, ge=1, source=f"{LLAMAREC} config.py:146 lora_early_stopping_patience=20")
    eval_batch_size: int = hp(8, ge=1, role="harness")

    def __post_init__(self) -> None:
        index_labels(self.k)  # 1..26


CPU_BUDGET = Budget(
    reason="a 2-core CPU trains ~400 prompt tokens/s; every prefix of every user (~97k prompts of ~600 tokens on "
           "ML-100K) would take about 40 hours, and validation on every retrieved user every 100 steps most of that again",
    changes={"max_train_examples": 1024, "valid_users": 128},
)


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
    RECIPE_VERSION: ClassVar[int] = 2
    REFERENCE: ClassVar[str] = f"{LLAMAREC} (Yue et al. 2023, arXiv 2310.19488)"
    BUDGETS: ClassVar[dict[str, Budget]] = {"cpu": CPU_BUDGET}

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

    def encode_prompts(self, histories: list[np.ndarray], candidates: list[np.ndarray],
                       chunk: int | None = None) -> list[np.ndarray]:
        """Token ids (int32) of each prompt, tokenized `chunk` prompts at a time: the texts and
        the tokenizer's Python lists of one chunk exist at once, never those of every prompt
        (ML-1M has 981k training prompts of ~600 tokens: tens of GiB as Python ints)."""
        _, _, add_special = self._frame()
        n = self._history_len()
        chunk = chunk or ENCODE_CHUNK
        out: list[np.ndarray] = []
        for start in range(0, len(histories), chunk):
            texts = [self.prompt_text(np.asarray(h)[-n:], c)
                     for h, c in zip(histories[start : start + chunk], candidates[start : start + chunk])]
            ids = self.llm.tokenizer(texts, add_special_tokens=add_special)["input_ids"]
            out.extend(np.asarray(row, dtype=np.int32) for row in ids)
        return out

    def _history_len(self) -> int:
        return int(self.params.history_len)

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
        out = []
        for start in range(0, len(pairs), ENCODE_CHUNK):  # one chunk of prompt texts at a time
            histories, cand_lists, answers = [], [], []
            for index, (u, t) in enumerate(pairs[start : start + ENCODE_CHUNK], start):
                seq = data.train[u]
                rng = np.random.default_rng([self.ctx.seed, 7, index])
                target = int(seq[t])
                negatives = negatives_for(rng, data.n_items, np.append(seq[:t], target), k - 1)
                cands = rng.permutation(np.append(negatives, target))
                histories.append(seq[:t])
                cand_lists.append(cands)
                answers.append(int(np.flatnonzero(cands == target)[0]))
            for prompt, answer in zip(self.encode_prompts(histories, cand_lists), answers):
                response = np.asarray([self.letter_ids[answer], self.llm.eos_id], dtype=np.int32)
                ids = np.concatenate([prompt, response])
                labels = np.concatenate([np.full(len(prompt), IGNORE, dtype=np.int32), response])
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
        self.llm = p.load_model(self.ctx)
        self.letter_ids = label_token_ids(self.llm, index_labels(p.k))
        self.texts = self._truncated_texts(data)
        config = p.train_config(seed=self.ctx.seed, precision=p.precision, progress=self.ctx.progress)
        examples = self.training_examples(data, config.max_train_examples)
        self.n_train = len(examples)
        validate = self._validator(data, p.valid_users, config, len(examples))
        model = prepare_model(self.llm.model, config)
        extra = f"llamarec|{self.llm.path}|{p.retriever}|{data.fingerprint}"
        # the retriever's settings shape validation (which users, which candidates), so they key training too
        retriever_params = getattr(self.retriever, "params", None)
        key_extra = f"{extra}|{getattr(validate, 'n_users', 0)}|" + (
            json.dumps(params_key(retriever_params), sort_keys=True, default=str) if is_dataclass(retriever_params) else "")
        work = training_dir(self.ctx, "llamarec", p, fields_with_role(p, "infer", "harness"), key_extra)
        model, self.result = train(model, examples, config, pad_id=self.llm.pad_id, work_dir=work,
                                   validate=validate, fingerprint_extra=extra)
        self.llm.model = merge_for_inference(model, p.precision)
        self.ctx.notes["llamarec"] = {
            "retriever": p.retriever,
            "train_examples": self.n_train,
            "train_tokens": int(sum(len(ids) for ids, _ in examples)),
            "steps": self.result.steps,
            "best_step": self.result.best_step,
            "best_valid_ndcg@10": self.result.best_score,
            "valid_users": 0 if validate is None else int(getattr(validate, "n_users", 0)),
            "train_seconds": round(self.result.total_seconds, 2),
            "prior_train_seconds": round(self.result.prior_seconds, 2),  # of attempts before a resume
            "history": self.result.history,
            "precision": p.precision,
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
                                   progress=progress, precision=self.params.precision)
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
