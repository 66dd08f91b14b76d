"""CALRec: contrastive alignment of a generative LLM for sequential recommendation.

Li et al., "CALRec: Contrastive Alignment of Generative LLMs for Sequential
Recommendation", RecSys 2024 (arXiv 2405.02429). No public code; the method details below
come from the sourced notes in ``baselines/sources/calrec.md`` (tags [S1]..[S11] refer to
them). Where the paper (as far as the notes reach) leaves a choice open, it is a
hyperparameter whose default and source are given here.

Model. One LLM serves as two towers with shared weights [S1, S2]:

- user tower: the history as text (the SFT prompt, `prompt="movie"`; the paper's own
  "The first/next item is as follows:" layout [S3 §1.2] is `prompt="calrec"`), followed by
  the target item's text as in teacher forcing [S7]. One forward pass gives
  v_U  = mean last-layer state over the history part of the prompt, and
  v_T|U = mean last-layer state over the target item's tokens (conditioned on the history);
- item tower: the target item's text alone, v_T = mean last-layer state over its tokens
  [S7] (the same tokens as the target span above, so v_T|U and v_T differ only by context).

`user_pooling="history"` (default) pools v_U from the first token after the shared
instruction (the history block and the closing template tokens; the system prompt and
instruction are identical for every user and would only add a constant); "prompt" pools
over the whole prompt. [S7] says "the history tokens" without more detail.

Loss [S1 abstract: "a mixture of two contrastive losses and a language modeling loss";
names L_NIG / L_TT / L_UT per S4; formulas 2nd-hand per S7]:

  L = nig_weight * L_NIG + tt_weight * L_TT + ut_weight * L_UT

- L_NIG: next-item generation, cross-entropy on the target item's tokens and eos given
  the prompt (SFT's loss). Averaged over each example's target tokens, then over examples
  (S7 writes the per-sequence token sum; the token mean keeps the mixture independent of
  title length).
- L_TT: in-batch InfoNCE between v_T|U (query) and v_T (key); L_UT: the same with v_U.
  Cosine similarity / `tau`. Negatives: the other examples of the micro-batch; an example
  whose target has the same text (the same item twice in a batch, or a duplicate title)
  is masked out of the softmax instead of counted as a negative
  (`benchmark.llm.contrastive.info_nce`). `contrastive="both"` averages the user->item and
  item->user directions; S7's formula normalises over the batch's users for each target
  ("k2q"); symmetric is the notes' engineering default (symmetry not verified).
- Weights: S7 gives L = (1-a-b) L_NIG + a L_TT + b L_UT with "a = b = 0.5 effective",
  which would switch L_NIG off and contradicts a generative model decoded with BM25 (the
  notes flag it). Default here: nig 1, tt 0.5, ut 0.5 (the S7 contrastive weights, L_NIG
  kept at 1). `tau` is not reported: 0.05 (notes' engineering range 0.05-0.1).

Two stages [S1, S2, S3, S5], both run by default (the paper: both are crucial): stage 1
fine-tunes on a mixture of domains, stage 2 on the target domain starting from stage 1's
weights. `stage1="auto"` (default) takes the other MovieLens dataset of the pair (ml-1m for
ml-100k, ml-100k for ml-1m; none for other datasets, named in the notes);
`stage1="ml-1m,synthetic"` names the datasets (loaded by the runner under this run's
protocol); `stage1=""` skips stage 1. Leakage check: a stage-1 dataset whose training
interactions reach past the target's first test interaction (ML-1M, 2000-2003, for
ML-100K, 1997-1998) is flagged in the row's notes (`stage1_leak="flag"`) or refused
("refuse").
In the paper the target categories are part of the stage-1 mixture (9 categories in stage
1, 7 of them only there [S7]): `stage1_include_target=True` adds the target domain's
training sequences. The mixture is pooled and capped jointly (seeded), so each domain
contributes in proportion to its size. Stage 1 has no early stopping. With LoRA the stage-1
adapters are merged into the weights and stage 2 trains fresh adapters. Each stage
checkpoints in a directory named by its training fingerprint under the run store's model
cache (runs/.cache/models/calrec-stage{1,2}-<fp>; ctx.work_dir/stage{1,2} without a cache),
so a rerun resumes or reuses each, and units that differ only in inference mode train once;
stage 2's fingerprint includes stage 1's.

Backbone: the paper fully fine-tunes PaLM-2 XXS [S7, S8, S9]; here any causal LM (default
the bundled SmolLM2-135M-Instruct), fully fine-tuned as the paper. lr, steps and batch size
are not reported: CFT's full fine-tuning schedule (lr 1e-4, batch 16 x 4, 3 epochs,
patience 1), the closest open recipe for a generative next-item LLM. Every value and its
source: `python -m benchmark recipes calrec`.

Inference (`inference=`):

- "bm25" (the paper's quasi-round-robin retrieval [S4, S5, S6; mechanics S7]): sample
  `n_samples` generations at `temperature` (plain temperature sampling, no top-k/top-p),
  order them by the model's log-probability (`sample_order="logprob"`; the paper's order is
  not reported, "sample" keeps sampling order), retrieve each one's BM25 list over the
  catalog item texts (bm25s, k1/b defaults 1.5/0.75; S10: the paper found a k1/b search
  not critical), and interleave the lists round-robin, skipping repeats, seen items and
  non-candidates (`benchmark.grounding.ground_bm25`). Items that share no word with a
  generation are not retrieved; rows left shorter than k are filled with the most popular
  unseen training items (the harness's fill rule; info reports how many positions).
  N and temperature are not reported: 16 samples (notes suggest 8-32), temperature 0.7.
- "dense" (not in the paper as far as the notes reach; the two-tower embeddings used
  directly): v_U of the prompt vs v_T of every catalog item, cosine, top-k without seen
  and non-candidate items. Catalog embeddings are computed in batches once per trained
  weights and cached in ctx.work_dir/item_embeddings/ under a fingerprint of the weights,
  the item texts and the pooling.

The CPU budget ("cpu"): 1,024 stage-1 and 2,048 stage-2 examples, one epoch, 256
validation users, 8 samples.

Reported in ctx.notes["calrec"]: inference mode, examples / steps / train seconds per
stage (across every attempt that built its checkpoint), their sum and the part of it spent
before a resume, catalog embedding seconds and whether they came from the cache (dense).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines.sft import exclusions, history_texts
from benchmark.errors import ConfigError
from benchmark.llm.contrastive import DIRECTIONS
from benchmark.hparams import hp
from benchmark.llm.fields import BUNDLED_LLM, LLMFields, TrainFields
from benchmark.llm.loading import LLM
from benchmark.llm.precision import PRECISIONS, autocast, cpu_threads, fp32, inference_precision
from benchmark.llm.pooling import cached_item_embeddings, embed_batches
from benchmark.llm.prompts import (
    IGNORE,
    ITEM_TEXT_STYLES,
    TEMPLATES,
    PromptTemplate,
    catalog_texts,
    encode_examples,
    prompt_frame,
    prompt_ids_batch,
    response_ids_batch,
)
from benchmark.llm.sampling import sample_generations
from benchmark.llm.training import (
    TrainConfig,
    TrainResult,
    cap_examples,
    merge_for_inference,
    prepare_model,
    sequence_examples,
    train,
)
from benchmark.llm.two_tower import CALRecExample, calrec_collate, calrec_terms
from benchmark.ranking import fill_by_popularity
from benchmark.recipes import Budget
from benchmark.registry import Method, register_method
from benchmark.types import PAD, CandidateSet, RankedLists, RankRequest, TrainData

INFERENCE_MODES = ("bm25", "dense")

# The paper's layout as the notes render it [S3 §1.2]: a sequence prefix, then each item
# introduced by "The first/next ... item is as follows:". The exact English wording is not
# verified; item text here is the catalog's (title, year) rather than attribute: value pairs.
CALREC_TEMPLATE = PromptTemplate(
    instruction=(
        "This is a summary of the user's interaction history, in order. "
        "Write the next item the user will interact with, in the same format."
    ),
    history_block="The first item is as follows: {history}",
    item_quote="",
    item_separator="\nThe next item is as follows: ",
    system="You are a recommender system.",
)
PROMPTS: dict[str, PromptTemplate] = {**TEMPLATES, "calrec": CALREC_TEMPLATE}


def parse_specs(text: str) -> list[str]:
    """'ml-1m,synthetic:seed=1,n_users=50' -> ['ml-1m', 'synthetic:seed=1,n_users=50'].

    A comma-separated part with '=' but no ':' continues the previous spec's options.
    """
    specs: list[str] = []
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return list(dict.fromkeys(specs))


NOTES = "baselines/sources/calrec.md"
NOT_REPORTED = "not reported (baselines/sources/calrec.md 'Not found')"
CFT_SCHEDULE = f"{NOT_REPORTED}; CFT's full fine-tuning schedule (itsmeyjt/CFT run.sh), the closest open recipe"
# stage-1 datasets the harness uses by default for a target (the paper mixes other categories of the same source)
STAGE1_AUTO = {"ml-100k": "ml-1m", "ml-1m": "ml-100k"}


@dataclass
class CALRecParams(TrainFields, LLMFields):
    """The paper's values where the notes reach them; each other value says why it was chosen."""

    llm: str | None = hp(None, none=BUNDLED_LLM, reference="PaLM-2 XXS",
                         why="PaLM-2 is not openly available; the bundled SmolLM2-135M-Instruct unless --llm",
                         source=f"{NOTES} [S7, S8, S9]")
    precision: str = hp("bf16", choices=PRECISIONS, source=f"{NOT_REPORTED}; bf16 as every LLM recipe here")
    item_text: str = hp("title_year", choices=ITEM_TEXT_STYLES,
                        source=f"{NOTES} [S3 §1.2] attribute text; MovieLens has title and year")
    prompt: str = hp("calrec", choices=tuple(PROMPTS), source=f"{NOTES} [S3 §1.2] sequence prefix + per-item prefixes")
    history_len: int = hp(10, ge=1, source=f"{NOT_REPORTED}; 10 as the other generative recipes here")
    user_pooling: str = hp("history", choices=("history", "prompt"), source=f"{NOTES} [S7] mean over the history tokens")
    nig_weight: float = hp(1.0, ge=0, source=f"{NOTES} [S7] gives (1-a-b) with a=b=0.5, which would remove L_NIG; kept at 1")
    tt_weight: float = hp(0.5, ge=0, source=f"{NOTES} [S7] a = 0.5")
    ut_weight: float = hp(0.5, ge=0, source=f"{NOTES} [S7] b = 0.5")
    tau: float = hp(0.05, gt=0, source=f"{NOT_REPORTED}; the notes' engineering range 0.05-0.1")
    contrastive: str = hp("both", choices=DIRECTIONS, source=f"{NOTES} [S7] direction not verified; symmetric")
    lora: bool = hp(False, source=f"{NOTES} [S7, S8, S9] PaLM-2 XXS fully fine-tuned")
    lora_r: int = hp(8, ge=1, source="used only with lora=true (BIGRec's value)")
    lora_alpha: int = hp(16, ge=1, source="used only with lora=true (BIGRec's value)")
    lora_dropout: float = hp(0.05, ge=0, lt=1, source="used only with lora=true (BIGRec's value)")
    lora_targets: str = hp("q_proj,v_proj", source="used only with lora=true (BIGRec's value)")
    lr: float = hp(1e-4, gt=0, source=CFT_SCHEDULE)
    weight_decay: float = hp(0.0, ge=0, source=CFT_SCHEDULE)
    max_grad_norm: float = hp(1.0, ge=0, source=CFT_SCHEDULE)
    warmup_steps: int = hp(20, ge=0, source=CFT_SCHEDULE)
    epochs: int = hp(3, ge=1, source=CFT_SCHEDULE)
    batch_size: int = hp(16, ge=1, source=f"{CFT_SCHEDULE}; in-batch negatives need at least 2")
    grad_accum: int = hp(4, ge=1, source=CFT_SCHEDULE)
    max_train_examples: int | None = hp(None, ge=1, none="all", source=f"{NOTES} [S7] the target categories' users")
    early_stopping: str = hp("loss", choices=("loss", "ndcg", "none"), source=CFT_SCHEDULE)
    valid_users: int | None = hp(None, ge=1, none="all", source=CFT_SCHEDULE)
    eval_every: int = hp(0, ge=0, source=CFT_SCHEDULE)
    patience: int = hp(1, ge=1, source=CFT_SCHEDULE)
    # stage 1 (mixture of domains)
    stage1: str = hp("auto", source=f"{NOTES} [S1] both stages are crucial; auto: ml-1m for ml-100k and ml-100k "
                                    "for ml-1m, none for other datasets (name them: stage1=spec,spec)")
    stage1_include_target: bool = hp(True, source=f"{NOTES} [S7] the target categories are part of stage 1")
    stage1_leak: str = hp("flag", choices=("flag", "refuse"),
                          source="harness rule: a stage-1 dataset with training interactions after the target's "
                                 "first test interaction is flagged in the notes, or refused")
    stage1_max_examples: int | None = hp(None, ge=1, none="all", source=f"{NOTES} [S7] 3.59M users in stage 1")
    stage1_epochs: int = hp(1, ge=1, source=f"{NOT_REPORTED}; one pass over the mixture")
    stage1_lr: float | None = hp(None, gt=0, none="lr", source=f"{NOT_REPORTED}; stage 2's rate")
    stage1_max_steps: int | None = hp(None, ge=1, none="the epochs", source="whole epochs (no step cap)")
    # inference
    inference: str = hp("bm25", choices=INFERENCE_MODES, role="infer",
                        source=f"{NOTES} [S4, S5, S6] quasi-round-robin BM25 retrieval")
    n_samples: int = hp(16, ge=1, role="infer", source=f"{NOT_REPORTED}; the notes suggest 8-32")
    temperature: float = hp(0.7, ge=0, role="infer", source=f"{NOT_REPORTED}; the notes suggest 0.5-1.0")
    sample_order: str = hp("logprob", choices=("logprob", "sample"), role="infer",
                           source=f"{NOT_REPORTED}; lists interleaved best log-probability first")
    max_new_tokens: int = hp(32, ge=1, role="infer", source=f"{NOT_REPORTED}; longer than every MovieLens title")
    bm25_k1: float = hp(1.5, gt=0, role="infer", source=f"{NOTES} [S10] a k1/b search is not critical; bm25s default")
    bm25_b: float = hp(0.75, ge=0, le=1, role="infer", source=f"{NOTES} [S10]; bm25s default")
    eval_batch_size: int = hp(8, ge=1, role="harness")  # users per generation batch
    embed_batch_size: int = hp(64, ge=1, role="harness")  # texts per embedding batch (dense)

    def __post_init__(self) -> None:
        if self.nig_weight + self.tt_weight + self.ut_weight == 0:
            raise ValueError("at least one loss weight must be positive")
        if (self.tt_weight or self.ut_weight) and self.batch_size < 2:
            raise ValueError("the contrastive losses use in-batch negatives: batch_size must be at least 2")

    @property
    def contrastive_on(self) -> bool:
        return bool(self.tt_weight or self.ut_weight)


CPU_BUDGET = Budget(
    reason="a 2-core CPU cannot train on every example of both stages (~1M stage-1 examples with ML-1M) nor "
           "sample 16 generations for every user quickly; budget as SFT's",
    changes={"stage1_max_examples": 1024, "max_train_examples": 2048, "epochs": 1, "valid_users": 256,
             "n_samples": 8},
)


def calrec_loss(model: Any, batch: dict[str, torch.Tensor], p: CALRecParams) -> tuple[torch.Tensor, int]:
    """(sum over the batch's examples of the weighted per-example loss, number of examples)."""
    terms = calrec_terms(model, batch, tau=p.tau, direction=p.contrastive, tt=p.tt_weight > 0, ut=p.ut_weight > 0)
    loss = p.nig_weight * terms["nig"]
    if "tt" in terms:
        loss = loss + p.tt_weight * terms["tt"]
    if "ut" in terms:
        loss = loss + p.ut_weight * terms["ut"]
    return loss.sum(), int(loss.shape[0])


# -- the method ------------------------------------------------------------------------------------


def _leaks(source: dict, target: dict) -> bool:
    """A stage-1 source leaks when it trains on an interaction later than the target's first test interaction."""
    last, first_test = source.get("train_max"), target.get("test_min")
    return last is not None and first_test is not None and int(last) > int(first_test)


def _single_validation(config: TrainConfig, n_examples: int) -> bool:
    steps_per_epoch = max(1, math.ceil(math.ceil(n_examples / config.batch_size) / config.grad_accum))
    total = config.max_steps or steps_per_epoch * config.epochs
    return total <= (config.eval_every or steps_per_epoch)


@register_method("calrec")
class CALRec(Method):
    """One LLM as user and item tower: generation + two in-batch contrastive losses, two stages."""

    Params = CALRecParams
    uses_llm = True
    RECIPE_VERSION: ClassVar[int] = 2
    REFERENCE: ClassVar[str] = "Li et al., RecSys 2024 (arXiv 2405.02429); no public code, notes in baselines/sources/calrec.md"
    BUDGETS: ClassVar[dict[str, Budget]] = {"cpu": CPU_BUDGET}

    @classmethod
    def check_params(cls, params: CALRecParams) -> None:
        from benchmark.data import check_dataset

        if params.stage1.strip() == "auto":
            return  # the other MovieLens of the pair, or none: chosen at fit from the target dataset
        for spec in parse_specs(params.stage1):
            check_dataset(spec)  # an unknown stage-1 dataset fails before any work

    def __init__(self, params: CALRecParams, ctx):
        super().__init__(params, ctx)
        self.llm: LLM | None = None
        self.template: PromptTemplate | None = None
        self.texts: list[str] = []
        self.popularity: np.ndarray | None = None
        self.item_embeddings: torch.Tensor | None = None
        self.weights_fingerprint = ""
        self.n_train = 0
        self.n_stage1 = 0
        self.stage1_names = ""
        self._stage1_times: list[tuple[str, dict]] = []
        self.results: dict[str, TrainResult] = {}
        self._bm25 = None
        self._prefix_ids: list[int] | None = None

    # -- setup -------------------------------------------------------------------------------
    def _load(self) -> LLM:
        return self.params.load_model(self.ctx)

    def train_config(self, stage: int) -> TrainConfig:
        p = self.params
        config = p.train_config(seed=self.ctx.seed, precision=p.precision, progress=self.ctx.progress)
        if stage == 1:  # no early stopping in stage 1
            config = dataclasses.replace(
                config, lr=p.stage1_lr if p.stage1_lr is not None else p.lr, epochs=p.stage1_epochs,
                max_steps=p.stage1_max_steps, eval_every=0, patience=0, max_train_examples=p.stage1_max_examples)
        return config

    def _user_start(self, prompt: Sequence[int]) -> int:
        """First token of the user-specific part of a prompt (after the shared instruction)."""
        if self.params.user_pooling == "prompt":
            return 0
        if self._prefix_ids is None:
            before, _, add_special = prompt_frame(self.llm, self.template)
            text = before + self.template.instruction
            self._prefix_ids = list(self.llm.tokenizer(text, add_special_tokens=add_special)["input_ids"])
        n = 0
        for a, b in zip(self._prefix_ids, prompt):
            if a != b:
                break
            n += 1
        return min(n, max(len(prompt) - 1, 0))

    def _encode(self, hists: list[list[str]], targets: list[str]) -> list[CALRecExample]:
        out = []
        for ids, labels in encode_examples(self.llm, self.template, hists, targets):
            plen = int(np.argmax(labels != IGNORE))
            item = ids[plen:-1]  # the target's tokens without eos
            out.append((ids, labels, self._user_start(ids[:plen]), plen, item))
        return out

    def _domain_examples(self, pools: list[tuple[list[np.ndarray], list[str]]], cap: int | None) -> list[CALRecExample]:
        """Examples from several domains (sequences, item texts), pooled, then one seeded cap."""
        n = self.params.history_len
        tagged = [(d, u, t) for d, (seqs, _) in enumerate(pools) for u, t in sequence_examples(seqs, history_len=n)]
        tagged = cap_examples(tagged, cap, seed=self.ctx.seed)
        hists, targets = [], []
        for d, u, t in tagged:
            seqs, texts = pools[d]
            hists.append(history_texts(texts, seqs[u][:t], n))
            targets.append(texts[int(seqs[u][t])])
        return self._encode(hists, targets)

    def _valid_rows(self, data: TrainData, n_users: int | None) -> np.ndarray:
        rows = np.array([r for r in range(len(data.valid)) if len(data.valid.histories[r]) > 0], dtype=np.int64)
        if n_users is not None and n_users < len(rows):
            rows = np.sort(self.ctx.rng(17).choice(rows, size=n_users, replace=False))
        return rows

    def train_hooks(self) -> dict[str, Any]:
        p = self.params

        def collate_fn(examples, pad_id, device):
            return calrec_collate(examples, pad_id, device)

        def loss_fn(model, batch):
            return calrec_loss(model, batch, p)

        return {"collate_fn": collate_fn, "loss_fn": loss_fn, "example_weight": lambda example: 1.0}

    def _loss_validator(self, examples: list[CALRecExample]):
        """Minus the mean CALRec loss on fixed validation batches (higher is better)."""
        p, pad = self.params, self.llm.pad_id
        batches = [examples[i : i + p.batch_size] for i in range(0, len(examples), p.batch_size)]

        def validate(model: Any) -> float:
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad(), autocast(device, p.precision):
                for chunk in batches:
                    loss, n = calrec_loss(model, calrec_collate(chunk, pad, device), p)
                    total += float(loss)
                    count += n
            model.train(was_training)
            return -total / max(count, 1)

        return validate

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, data: TrainData) -> None:
        with cpu_threads(self.params.num_threads):
            self._fit(data)

    def stage1_specs(self, data: TrainData) -> list[str]:
        """The stage-1 datasets: `stage1`, or for "auto" the other MovieLens of the pair."""
        text = self.params.stage1.strip()
        if text == "auto":
            text = STAGE1_AUTO.get(data.dataset, "")
        return parse_specs(text)

    def _stage1_pools(self, data: TrainData, specs: list[str]) -> tuple[list, list[str]]:
        if self.ctx.dataset_loader is None:
            raise ConfigError("calrec.stage1 needs other datasets, but this run context has no dataset loader")
        pools, names = [], []
        self._stage1_times: list[tuple[str, dict]] = []
        if self.params.stage1_include_target:
            pools.append((data.train, self.texts))
            names.append(f"{data.dataset}:{data.fingerprint}")
        for spec in specs:
            split = self.ctx.dataset_loader(spec)
            if split.fingerprint == data.fingerprint:
                continue  # the target domain itself: included (or not) by stage1_include_target
            pools.append((split.train, catalog_texts(split.catalog, self.params.item_text)))
            names.append(f"{split.dataset}:{split.fingerprint}")
            self._stage1_times.append((split.dataset, dict(split.config.get("times") or {})))
        return pools, names

    def _fit(self, data: TrainData) -> None:
        p, ctx = self.params, self.ctx
        self.template = PROMPTS[p.prompt]
        self._prefix_ids = None
        self.llm = self._load()
        self.texts = catalog_texts(data.catalog, p.item_text)
        seen = [np.asarray(s, dtype=np.int64) for s in data.train] + [np.zeros(0, np.int64)]
        counts = np.bincount(np.concatenate(seen), minlength=data.n_items)
        self.popularity = np.argsort(-counts, kind="stable")
        self.item_embeddings, self._bm25 = None, None
        device = self.llm.device
        hooks = self.train_hooks()
        common = f"{self.llm.path}|{p.item_text}|{p.prompt}|{p.history_len}|{p.user_pooling}|" \
                 f"{p.nig_weight},{p.tt_weight},{p.ut_weight},{p.tau},{p.contrastive}"
        notes: dict[str, Any] = {"inference": p.inference, "stage1": None}
        model = self.llm.model
        self.results = {}

        # stage 1: mixture of domains
        stage1_fp = ""
        specs = self.stage1_specs(data)
        if specs:
            config1 = self.train_config(stage=1)
            pools, names = self._stage1_pools(data, specs)
            leaks = [name for name, times in self._stage1_times if _leaks(times, data.times)]
            if leaks and p.stage1_leak == "refuse":
                raise ConfigError(f"calrec stage 1: {', '.join(leaks)} has training interactions after the first "
                                  f"test interaction of {data.dataset}; name other stage-1 datasets "
                                  "(calrec.stage1=...) or set calrec.stage1_leak=flag")
            notes["stage1_leak"] = leaks
            examples1 = self._domain_examples(pools, config1.max_train_examples)
            self.n_stage1 = len(examples1)
            self.stage1_names = ",".join(specs)
            extra1 = f"calrec-stage1|{common}|{';'.join(names)}"
            model = prepare_model(model, config1)
            stage1_dir = self._stage_dir("stage1", config1.fingerprint(len(examples1), extra1))
            model, res1 = train(model, examples1, config1, pad_id=self.llm.pad_id, work_dir=stage1_dir,
                                fingerprint_extra=extra1, **hooks)
            self.results["stage1"] = res1
            stage1_fp = config1.fingerprint(len(examples1), extra1)
            model = merge_for_inference(model, "fp32" if not p.lora else p.precision)  # stage 2 starts here
            notes["stage1"] = {"datasets": names, "examples": len(examples1), "steps": res1.steps,
                               "resumed_from": res1.resumed_from, "train_seconds": round(res1.total_seconds, 2)}

        # stage 2: the target domain
        config2 = self.train_config(stage=2)
        examples = self._domain_examples([(data.train, self.texts)], config2.max_train_examples)
        self.n_train = len(examples)
        validate = None
        rows = self._valid_rows(data, p.valid_users)
        if p.early_stopping == "none" or _single_validation(config2, len(examples)):
            rows = rows[:0]  # one validation at the very end selects nothing: save its cost
        if p.early_stopping == "loss" and len(rows):
            valid = data.valid
            hists = [history_texts(self.texts, valid.histories[r], p.history_len) for r in rows]
            validate = self._loss_validator(self._encode(hists, [self.texts[int(valid.targets[r])] for r in rows]))
        elif p.early_stopping == "ndcg" and len(rows):
            request = RankRequest(users=data.valid.users[rows], histories=[data.valid.histories[r] for r in rows],
                                  candidates=CandidateSet("full", data.valid.users[rows]), k=10, stage="valid")

            def validate(model: Any) -> float:
                scores = ctx.validate(self._rank_with(model, request, progress=False, cache=False))
                return float(scores.get("ndcg@10", next(iter(scores.values()))))

        # the inference mode shapes training only through NDCG early stopping
        selection = f"{p.early_stopping}" + (f"/{p.inference}" if p.early_stopping == "ndcg" else "")
        extra2 = f"calrec-stage2|{common}|{data.fingerprint}|{selection}|{len(rows)}|{stage1_fp}"
        model = prepare_model(model, config2)
        stage2_dir = self._stage_dir("stage2", config2.fingerprint(len(examples), extra2))
        model, res2 = train(model, examples, config2, pad_id=self.llm.pad_id, work_dir=stage2_dir,
                            validate=validate, fingerprint_extra=extra2, **hooks)
        self.results["stage2"] = res2
        self.llm.model = merge_for_inference(model, p.precision)
        self.weights_fingerprint = self._fingerprint(config2.fingerprint(len(examples), extra2), data.fingerprint)
        notes["stage2"] = {"examples": len(examples), "steps": res2.steps, "best_step": res2.best_step,
                           "best_score": res2.best_score, "stopped_early": res2.stopped_early,
                           "resumed_from": res2.resumed_from, "train_seconds": round(res2.total_seconds, 2)}
        # training time across both stages and every attempt (a stage's checkpoint may predate this process)
        stages = [r for r in (self.results.get("stage1"), res2) if r is not None]
        notes["train_seconds"] = round(sum(r.total_seconds for r in stages), 2)
        notes["prior_train_seconds"] = round(sum(r.prior_seconds for r in stages), 2)
        if all(r.loaded_only for r in stages):
            notes["loaded_from"] = str(stage2_dir)  # both stages' finished checkpoints, only loaded
        ctx.notes["calrec"] = notes

    def _stage_dir(self, stage: str, fingerprint: str) -> Path:
        """Checkpoints of a training stage. Under the run store's model cache they are keyed by
        the training fingerprint alone, so units that differ only in inference (bm25 vs dense)
        train once; without a cache, in the unit's work directory."""
        if getattr(self.ctx, "cache_dir", None) is not None:
            return Path(self.ctx.cache_dir) / "models" / f"calrec-{stage}-{fingerprint}"
        return self.ctx.work_dir / stage

    def _fingerprint(self, train_fp: str, data_fp: str) -> str:
        """Identifies the trained weights and the item texts (the embedding cache key)."""
        digest = []
        with torch.no_grad():
            for name, param in self.llm.model.named_parameters():
                x = param.detach().float()
                digest.append([name, f"{float(x.sum()):.6e}", f"{float(x.abs().sum()):.6e}"])
        payload = {
            "train": train_fp, "data": data_fp, "item_text": self.params.item_text, "pooling": "mean",
            "texts": hashlib.sha256("\n".join(self.texts).encode()).hexdigest(), "weights": digest,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # -- rank ----------------------------------------------------------------------------------
    def rank(self, request: RankRequest) -> RankedLists:
        if self.llm is None:
            raise ConfigError("calrec: rank() called before fit()")
        with cpu_threads(self.params.num_threads), inference_precision(self.llm.model):
            return self._rank(request)

    def _rank(self, request: RankRequest) -> RankedLists:
        p = self.params
        ranked = self._rank_with(self.llm.model, request, progress=self.ctx.progress, cache=True)
        exclude = exclusions(request, len(self.texts))
        filled = np.zeros(len(ranked.users))
        for row in range(len(ranked.users)):
            ranked.items[row], filled[row] = fill_by_popularity(ranked.items[row], self.popularity, exclude[row])
        ranked.extras["filled"] = filled
        info: dict[str, Any] = {"inference": p.inference, "llm": self.llm.name, "train_examples": self.n_train,
                                "stage1_examples": self.n_stage1, "item_text": p.item_text}
        if p.inference == "bm25":
            info.update(n_samples=p.n_samples, temperature=p.temperature)
        info.update(self.ranking_info(ranked, request))
        ranked.info.update(info)
        self.ctx.notes.setdefault("calrec", {})["inference"] = p.inference
        return ranked

    def ranking_info(self, ranked: RankedLists, request: RankRequest) -> dict[str, Any]:
        """What the lists say about all ranked users (the runner recomputes it on merged shards)."""
        p = self.params
        filled = np.asarray(ranked.extras["filled"])
        leaks = (self.ctx.notes.get("calrec") or {}).get("stage1_leak") or []
        stage1 = (f"stage 1 on {self.stage1_names} ({self.n_stage1} examples"
                  + (f"; LEAK FLAGGED: {', '.join(leaks)} has interactions after the target's test start" if leaks
                     else "") + ")") if self.n_stage1 else "no stage 1"
        mode = (f"BM25 over {p.n_samples} sampled generations (T={p.temperature:g}), round-robin"
                if p.inference == "bm25" else "dense user-tower retrieval")
        note = (f"{self.llm.name}, {self.n_train} training examples, {stage1}; inference: {mode}"
                + (f"; {int((filled > 0).sum())} users' lists filled by popularity ({int(filled.sum())} positions)"
                   if filled.any() else "") + f", {p.precision}")
        return {"filled_positions": int(filled.sum()), "leaderboard_note": note}

    def _prompts(self, request: RankRequest) -> list[list[int]]:
        hists = [history_texts(self.texts, h, self.params.history_len) for h in request.histories]
        return prompt_ids_batch(self.llm, self.template, hists)

    def _rank_with(self, model: Any, request: RankRequest, *, progress: bool, cache: bool) -> RankedLists:
        exclude = exclusions(request, len(self.texts))
        prompts = self._prompts(request)
        if self.params.inference == "dense":
            return self._rank_dense(model, request, prompts, exclude, progress, cache)
        return self._rank_bm25(model, request, prompts, exclude, progress)

    # dense: user tower vs item tower
    def _catalog_embeddings(self, model: Any, progress: bool, cache: bool) -> torch.Tensor:
        if cache and self.item_embeddings is not None:
            return self.item_embeddings
        p = self.params

        def compute() -> torch.Tensor:
            ids = response_ids_batch(self.llm, self.texts)
            return embed_batches(model, ids, pad_id=self.llm.pad_id, batch_size=p.embed_batch_size,
                                 progress=progress, desc="embed catalog")

        t0 = time.perf_counter()
        path = None
        if cache and self.ctx.work_dir is not None:
            path = self.ctx.work_dir / "item_embeddings" / f"{self.weights_fingerprint}.safetensors"
        emb, cached = cached_item_embeddings(path, compute)
        if cache:
            self.item_embeddings = emb
            notes = self.ctx.notes.setdefault("calrec", {})
            notes["catalog_embedding_seconds"] = round(time.perf_counter() - t0, 3)
            notes["catalog_embeddings_cached"] = bool(cached)
        return emb

    def _rank_dense(self, model, request, prompts, exclude, progress, cache) -> RankedLists:
        items_emb = self._catalog_embeddings(model, progress, cache)
        starts = [self._user_start(pr) for pr in prompts]
        users_emb = embed_batches(model, prompts, starts=starts, pad_id=self.llm.pad_id,
                                  batch_size=self.params.embed_batch_size, progress=progress, desc="embed users")
        device = next(model.parameters()).device
        item_n = F.normalize(items_emb.float(), dim=-1).to(device)
        n, k, n_items = len(prompts), request.k, item_n.shape[0]
        items = np.full((n, k), PAD, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float64)
        chunk = 128
        for start in range(0, n, chunk):
            u = F.normalize(users_emb[start : start + chunk].float(), dim=-1).to(device)
            with fp32(device):  # similarities that rank stay fp32 under the caller's autocast
                sim = u @ item_n.T
            for r in range(sim.shape[0]):
                ex = exclude[start + r]
                if len(ex):
                    sim[r, torch.as_tensor(ex, device=device)] = float("-inf")
            if n_items <= 200_000:
                vals, idx = torch.sort(sim, dim=1, descending=True, stable=True)
                vals, idx = vals[:, :k], idx[:, :k]
            else:
                vals, idx = torch.topk(sim, min(k, n_items), dim=1)
            vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
            for r in range(vals.shape[0]):
                ok = np.isfinite(vals[r])
                items[start + r, : ok.sum()] = idx[r][ok]
                scores[start + r, : ok.sum()] = vals[r][ok]
        return RankedLists(users=np.asarray(request.users).copy(), items=items, scores=scores,
                           extras={"valid": np.ones(n)})

    # bm25: sampled generations -> BM25 lists -> round robin
    def _bm25_index(self):
        from benchmark.grounding import BM25Index

        if self._bm25 is None:
            self._bm25 = BM25Index(self.texts, k1=self.params.bm25_k1, b=self.params.bm25_b)
        return self._bm25

    def _rank_bm25(self, model, request, prompts, exclude, progress) -> RankedLists:
        from benchmark.grounding import ground_bm25, normalize_text, title_index

        p, llm, k = self.params, self.llm, request.k
        samples = sample_generations(
            model, prompts, n_samples=p.n_samples, temperature=p.temperature, max_new_tokens=p.max_new_tokens,
            pad_id=llm.pad_id, eos_id=llm.eos_id, batch_size=p.eval_batch_size, seed=self.ctx.seed, progress=progress,
        )
        texts = []
        for user in samples:
            if p.sample_order == "logprob":
                user = sorted(user, key=lambda s: -s[1])  # stable: ties keep sampling order
            texts.append([llm.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq, _ in user])
        ranked_ids = ground_bm25(texts, self._bm25_index(), k=k, exclude=exclude)
        index = title_index(self.texts)
        valid = np.array([1.0 if user and normalize_text(user[0]) in index else 0.0 for user in texts])
        n = len(prompts)
        items = np.full((n, k), PAD, dtype=np.int64)
        for row, ids in enumerate(ranked_ids):
            ids = np.asarray(ids, dtype=np.int64)[:k]
            items[row, : len(ids)] = ids
        return RankedLists(users=np.asarray(request.users).copy(), items=items, extras={"valid": valid})
