"""P2Rec: LLM-enhanced item embeddings from user-level preference parsing (arXiv 2406.00333).

Liu et al., "A Practice-Friendly LLM-Enhanced Paradigm with Preference Parsing for
Sequential Recommendation" (v1 title: TSLRec). No public code exists; only the abstract and
two third-party reviews could be read (notes in baselines/sources/p2rec.md, sources [S1]-[S5]
there). Every choice the paper leaves open is a hyperparameter; its default and where it
comes from are listed below.

The method, as implemented here:

1. Latent categories [S3, S4]. A pre-trained sequential model (``pretrained="sasrec"``,
   obtained with ``ctx.method_loader``: the very SASRec of this run and seed, shared with a
   standalone sasrec unit) gives item embeddings; seeded k-means
   (`benchmark.llm.kmeans`, k-means++ seeding, ``kmeans_restarts`` restarts) cuts them into
   K = ``n_clusters`` latent categories. The paper's K was not found; 32 is our default.
2. Prior preference distribution [S3, S4]: g_u[k] = the share of user u's training items in
   category k (sums to 1). ``target_items="all"`` (default, the paper's "normalised
   interaction frequency" over S^u) counts every training item; ``"shown"`` counts only the
   items the prompt lists (the last ``history_len``).
3. Information reconstruction [S1, S3, S4]: a user-level SFT, ONE example per user (not one
   per interaction: that is the efficiency claim, O(M) examples instead of O(sum |S^u|)).
   The LLM reads the user's last ``history_len`` items (titles by default,
   ``item_repr="id"`` gives "Item <internal id>" as the paper gives items by ID [S4]; how
   the paper tokenises ids was not found), its last hidden states are pooled
   (``pooling="mean"``; not found in the paper) and a linear head predicts g_u [S4].
   ``head_norm="l2"`` (ours) unit-normalises the pooled state before the head: SmolLM2's
   mean-pooled states have norm ~35 (one dimension near 28), so with raw inputs one Adam
   step (~lr per weight) moves a prediction by ~0.1 against targets of ~1/K = 0.03, and a
   4-step CPU smoke run on ML-100K ended with a held-out MSE 25% worse than the constant
   predictor (0.00513 vs 0.00410); with "l2" it was on a par (0.004099 vs 0.004105).
   ``loss="mse"`` [S4]: the head's raw output against g_u, squared error summed over the K
   categories and averaged over users (MSE x K; Adam is insensitive to that constant).
   ``loss="kl"``: KL(g_u || softmax(head output)). The head starts at zero weight and a
   bias equal to the best constant predictor (the training users' mean g, or its log for
   KL). LoRA r=8/alpha=16 on q/k/v/o by default (LoRA vs full tuning: not found; SFT's
   setting). The prompt (`TEMPLATES`) is ours: the paper's wording was not found; it is a
   short plain-text prompt without the chat template because only pooled states are used.
4. Information augmentation [S1, S4]: each item alone is fed through the tuned LLM as a
   "virtual user" whose sequence is that one item (same prompt); its pooled state is the
   item's enhanced embedding. All these prompts share a token prefix (instruction etc.),
   so by default (``prefix_cache=True``) the prefix runs once and its key/value cache is
   reused for every item: same numbers as running each full prompt, a few times faster.
   The embeddings are cached in ctx.work_dir under a fingerprint of the trained weights
   and prompt settings, so a rerun reuses them.
5. Downstream model [S1: "help train various future SRS models"; how: not found]. A NEW
   ``downstream`` model (default "sasrec", any registered method with
   ``set_initial_item_embeddings``) with the same hyperparameters as the pre-trained one
   (its resolved params, i.e. this run's --set overrides, when it is the same method;
   the method's defaults otherwise) gets its item table initialised from the enhanced
   embeddings and is trained on the same data; at serving only it ranks.
   Projection to its width (``projection``): "pca" (default; the centred embeddings'
   top principal components via torch.linalg.svd of their covariance, signs fixed, zero
   columns if fewer components exist), "random" (a seeded Gaussian projection of the
   centred embeddings) or "head" (the trained head's K-dim output for the virtual user,
   i.e. its inferred category distribution, centred, then a seeded Gaussian map to the
   width unless K equals it). The result is scaled to a std of ``init_std`` (0 = auto =
   the std of SASRec's own xavier-normal init of an [n_items+1, width] table, so the
   downstream optimiser sees the scale it was tuned for). ``init="replace"`` uses it as
   the table; ``init="add"`` adds it to a seeded xavier-normal random table.

Recipe version 2: every value with its source or reason in `P2RecParams`
(`python -m benchmark recipes p2rec`): all users, history 50, 3 epochs, 256 held-out
validation users (a seeded sample left out of fine-tuning, at most half of them, scored by
MSE exactly like training users; their minus MSE drives early stopping when more than one
validation would run, and the final held-out MSE is always reported next to that of the
constant predictor). The CPU budget ("cpu"): 256 users, history 20, one epoch, 32 held-out
users. The pre-trained and downstream models are the strongest SASRec recipe (`sasrec`).

Cost report, ``ctx.notes["p2rec"]``: fine-tuning examples (= users), tokens, train,
embedding and k-means seconds, K and cluster sizes, whether the embeddings came from the
cache, what instance-level SFT would have needed, the pre-trained model's notes, and the
downstream model's notes.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from baselines.sft import history_texts
from benchmark.config import resolve_params
from benchmark.errors import ConfigError
from benchmark.hparams import hp
from benchmark.llm.fields import BUNDLED_LLM, LLMFields, TrainFields
from benchmark.llm.kmeans import kmeans
from benchmark.llm.loading import LLM, resolve_device
from benchmark.llm.precision import PRECISIONS, autocast, cpu_threads
from benchmark.llm.pooling import POOLINGS, cached_item_embeddings, embed_batches
from benchmark.llm.preference import (  # noqa: F401  (tests reach the pieces through this module)
    PROJECTIONS,
    Example,
    collate_examples,
    distribution_loss,
    embed_shared_prefix,
    head_input,
    head_predictions,
    leaderboard_note,
    predicted_distribution,
    preference_targets,
    project_embeddings,
    xavier_std,
    _examples_hash,
    _weights_hash,
)
from benchmark.llm.prompts import ITEM_TEXT_STYLES, PromptTemplate, catalog_texts, prompt_ids_batch
from benchmark.llm.training import (
    TrainConfig,
    TrainResult,
    merge_for_inference,
    prepare_model,
    train,
    trainable_state,
)
from benchmark.recipes import Budget
from benchmark.registry import Method, get_method, register_method
from benchmark.types import RankedLists, RankRequest, TrainData

# Short plain-text prompts: the representation is a pooled state, nothing is generated.
TEMPLATES = {
    "movie": PromptTemplate(
        instruction="Infer the user's movie preferences from the movies they watched, in order.",
        history_block="Watched: {history}",
        system=None,
        use_chat_template=False,
        plain_layout="{instruction}\n\n{input}",
    ),
    "generic": PromptTemplate(
        instruction="Infer the user's preferences from the items they interacted with, in order.",
        history_block="Interacted with: {history}",
        system=None,
        use_chat_template=False,
        plain_layout="{instruction}\n\n{input}",
    ),
}
LOSSES = ("mse", "kl")
INITS = ("replace", "add")
ITEM_REPRS = ("text", "id")
TARGET_ITEMS = ("all", "shown")
HEAD_NORMS = ("l2", "none")



NOTES = "baselines/sources/p2rec.md"
NOT_FOUND = "not found in the readable parts of the paper (baselines/sources/p2rec.md)"


@dataclass
class P2RecParams(TrainFields, LLMFields):
    """The paper's values where the notes reach them; each other value says why it was chosen."""

    # latent categories
    pretrained: str = hp("sasrec", source=f"{NOTES} [S3, S4] a pre-trained sequential model; here the strongest "
                                           "SASRec recipe (sasrec)")
    n_clusters: int = hp(32, ge=2, source=f"{NOT_FOUND}; 32")
    kmeans_restarts: int = hp(4, ge=1, source=f"{NOT_FOUND}; 4 k-means++ restarts")
    kmeans_iters: int = hp(100, ge=1, source=f"{NOT_FOUND}; 100")
    target_items: str = hp("all", choices=TARGET_ITEMS, source=f"{NOTES} [S3, S4] normalised interaction frequency")
    # user-level SFT
    llm: str | None = hp(None, none=BUNDLED_LLM, reference="not stated (an open LLM)",
                         why="the bundled SmolLM2-135M-Instruct unless --llm names another", source=NOTES)
    precision: str = hp("bf16", choices=PRECISIONS, source=f"{NOT_FOUND}; bf16 as every LLM recipe here")
    item_repr: str = hp("text", choices=ITEM_REPRS, source=f"{NOTES} [S4] items by ID; text: catalog titles")
    item_text: str = hp("title_year", choices=ITEM_TEXT_STYLES, source="MovieLens titles with the year")
    prompt: str = hp("movie", choices=tuple(TEMPLATES), source=f"{NOT_FOUND}; a short plain prompt (only pooled "
                                                             "states are used)")
    history_len: int = hp(50, ge=1, source=f"{NOT_FOUND}; 50")
    pooling: str = hp("mean", choices=POOLINGS, source=f"{NOT_FOUND}; mean over the prompt's tokens")
    head_norm: str = hp("l2", choices=HEAD_NORMS, source="harness choice: SmolLM2's pooled states have norm ~35 "
                                                         "(see the module docstring)")
    loss: str = hp("mse", choices=LOSSES, source=f"{NOTES} [S4] MSE reconstruction of the distribution")
    lora: bool = hp(True, source=f"{NOT_FOUND}; LoRA, as the paper stresses a practice-friendly cost")
    lora_r: int = hp(8, ge=1, source=f"{NOT_FOUND}; BIGRec's r=8")
    lora_alpha: int = hp(16, ge=1, source=f"{NOT_FOUND}; BIGRec's alpha=16")
    lora_dropout: float = hp(0.05, ge=0, lt=1, source=f"{NOT_FOUND}; BIGRec's 0.05")
    lora_targets: str = hp("q_proj,k_proj,v_proj,o_proj", source=f"{NOT_FOUND}; every attention projection")
    lr: float = hp(3e-4, gt=0, source=f"{NOT_FOUND}; the common LoRA rate")
    weight_decay: float = hp(0.0, ge=0, source=NOT_FOUND)
    max_grad_norm: float = hp(1.0, ge=0, source=NOT_FOUND)
    warmup_steps: int = hp(0, ge=0, source=NOT_FOUND)
    epochs: int = hp(3, ge=1, source=f"{NOT_FOUND}; 3")
    batch_size: int = hp(8, ge=1, source=NOT_FOUND)
    grad_accum: int = hp(1, ge=1, source=NOT_FOUND)
    max_users: int | None = hp(None, ge=1, none="all", source=f"{NOTES} [S1] one example per user, every user")
    max_train_examples: int | None = hp(None, ge=1, none="all", role="harness")  # unused: max_users caps examples
    valid_users: int = hp(256, ge=0, source=f"{NOT_FOUND}; 256 held-out users (0: none)")
    early_stopping: str = hp("mse", choices=("mse", "none"), source=f"{NOT_FOUND}; held-out MSE")
    eval_every: int = hp(0, ge=0, source=NOT_FOUND)
    patience: int = hp(3, ge=1, source=NOT_FOUND)
    # enhanced item embeddings
    prefix_cache: bool = hp(True, role="harness")  # run the item prompts' shared prefix once (same result, faster)
    embed_batch_size: int = hp(64, ge=1, role="harness")
    projection: str = hp("pca", choices=PROJECTIONS, source=f"{NOT_FOUND}; PCA to the downstream width")
    init: str = hp("replace", choices=INITS, source=f"{NOT_FOUND}; replace the downstream item table")
    init_std: float = hp(0.0, ge=0, source="0 = the std of the downstream model's own initial table")
    # downstream model
    downstream: str = hp("sasrec", source=f"{NOTES} [S1] 'help train various future SRS models'; SASRec+")


CPU_BUDGET = Budget(
    reason="a 2-core CPU fine-tunes the LLM on every user for 3 epochs in hours; 256 users, one epoch and 20 "
           "history items keep the LLM stage within minutes beside SASRec",
    changes={"max_users": 256, "epochs": 1, "history_len": 20, "valid_users": 32},
)


# -- the method ------------------------------------------------------------------------------------


@register_method("p2rec")
class P2Rec(Method):
    """User-level preference-parsing SFT -> LLM item embeddings -> a new downstream SASRec."""

    Params = P2RecParams
    uses_llm = True
    RECIPE_VERSION: ClassVar[int] = 2
    REFERENCE: ClassVar[str] = "Liu et al. 2024 (arXiv 2406.00333); no public code, notes in baselines/sources/p2rec.md"
    BUDGETS: ClassVar[dict[str, Budget]] = {"cpu": CPU_BUDGET}

    @classmethod
    def check_params(cls, params: P2RecParams) -> None:
        for field_name in ("pretrained", "downstream"):  # unknown names fail before any work
            get_method(getattr(params, field_name))

    def __init__(self, params: P2RecParams, ctx):
        super().__init__(params, ctx)
        self._down_cls = get_method(params.downstream)
        if not callable(getattr(self._down_cls, "set_initial_item_embeddings", None)):
            raise ConfigError(
                f"p2rec.downstream={params.downstream!r}: that method has no set_initial_item_embeddings(arr), "
                "so it cannot start from the LLM item embeddings; use a method that has it (e.g. sasrec)"
            )
        pre_cls = get_method(params.pretrained)
        if getattr(pre_cls, "uses_llm", False) or not callable(getattr(pre_cls, "item_embeddings", None)):
            raise ConfigError(
                f"p2rec.pretrained={params.pretrained!r}: the pre-trained model must be a classic method with "
                "item_embeddings() (e.g. sasrec)"
            )
        self.downstream: Any = None
        self.labels: np.ndarray | None = None
        self.train_users: np.ndarray | None = None
        self.valid_users: np.ndarray | None = None
        self.targets: np.ndarray | None = None  # g_u of the fine-tuning users, rows = train_users
        self.llm_embeddings: np.ndarray | None = None  # [n_items, d_llm] enhanced embeddings
        self.init_embeddings: np.ndarray | None = None  # [n_items, width], what the downstream starts from
        self.head: nn.Linear | None = None
        self.result: TrainResult | None = None

    # -- stage 0: pre-trained model, latent categories -----------------------------------------
    def _pretrained(self, data: TrainData) -> tuple[Any, str]:
        name = self.params.pretrained
        if self.ctx.method_loader is not None:
            return self.ctx.method_loader(name), "shared run unit (ctx.method_loader)"
        cls = get_method(name)
        method = cls(resolve_params(name, cls.Params, {}), dataclasses.replace(self.ctx, notes={}))
        method.fit(data)
        return method, "fitted here with default params (no ctx.method_loader)"

    def _downstream_params(self, retriever: Any) -> Any:
        p = self.params
        cls = self._down_cls
        if p.downstream == p.pretrained and isinstance(getattr(retriever, "params", None), cls.Params):
            return dataclasses.replace(retriever.params)
        return resolve_params(p.downstream, cls.Params, {})

    @staticmethod
    def _width(params: Any, name: str) -> int:
        for attr in ("hidden", "hidden_size", "embedding_size", "dim"):
            value = getattr(params, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ConfigError(f"p2rec.downstream={name!r}: its Params has no embedding width field (hidden)")

    # -- stage 1: user-level SFT -----------------------------------------------------------------
    def _texts(self, data: TrainData) -> list[str]:
        if self.params.item_repr == "id":
            return [f"Item {i}" for i in range(data.n_items)]
        return catalog_texts(data.catalog, self.params.item_text)

    def _split_users(self, data: TrainData, max_users: int | None, valid_users: int) -> tuple[np.ndarray, np.ndarray]:
        """(fine-tuning users, held-out validation users), disjoint, seeded, sorted."""
        eligible = np.array([u for u in range(data.n_users) if len(data.train[u]) > 0], dtype=np.int64)
        if not len(eligible):
            raise ConfigError("p2rec: no user has a training item; nothing to fine-tune on")
        perm = np.random.default_rng([self.ctx.seed, 31]).permutation(eligible)
        n_valid = min(valid_users, len(eligible) // 2)  # never more than half the users
        held, rest = perm[:n_valid], perm[n_valid:]
        if max_users is not None:
            rest = rest[:max_users]
        return np.sort(rest), np.sort(held)

    def _encode(self, data: TrainData, users: np.ndarray, history_len: int, k: int) -> list[Example]:
        last = history_len if self.params.target_items == "shown" else None
        targets = preference_targets([data.train[u] for u in users], self.labels, k, last=last)
        hists = [history_texts(self.texts, data.train[u], history_len) for u in users]
        prompts = prompt_ids_batch(self.llm, self.template, hists)
        return [(np.asarray(ids, dtype=np.int32), targets[row]) for row, ids in enumerate(prompts)]

    def _validator(self, examples: list[Example], head: nn.Module):
        def validate(model: Any) -> float:
            return -self._mse(model, head, examples)

        return validate if examples else None

    def _mse(self, model: Any, head: nn.Module, examples: list[Example]) -> float:
        """Mean squared error per category of the predicted distributions (held-out users)."""
        p = self.params
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total = 0.0
        with torch.no_grad(), autocast(device, p.precision):
            for start in range(0, len(examples), p.batch_size):
                batch = collate_examples(examples[start : start + p.batch_size], self.llm.pad_id, device)
                pred = predicted_distribution(head_predictions(model, head, batch, p.pooling, p.head_norm), p.loss)
                total += float(((pred - batch["targets"]) ** 2).mean(1).sum())
        model.train(was_training)
        return total / max(len(examples), 1)

    def _train_config(self) -> TrainConfig:
        p = self.params
        return p.train_config(seed=self.ctx.seed, precision=p.precision, progress=self.ctx.progress)

    @staticmethod
    def _single_validation(config: TrainConfig, n_examples: int) -> bool:
        steps_per_epoch = max(1, math.ceil(math.ceil(n_examples / config.batch_size) / config.grad_accum))
        total = config.max_steps or steps_per_epoch * config.epochs
        return total <= (config.eval_every or steps_per_epoch)

    # -- Method API ------------------------------------------------------------------------------
    def fit(self, data: TrainData) -> None:
        with cpu_threads(self.params.num_threads):
            self._fit(data)

    def _fit(self, data: TrainData) -> None:
        p = self.params
        k = p.n_clusters
        if k > data.n_items:
            raise ConfigError(
                f"p2rec.n_clusters={k} is larger than the catalog ({data.n_items} items); use at most {data.n_items}"
            )
        notes: dict[str, Any] = {"k": k}

        # stage 0 -------------------------------------------------------------------------------
        retriever, source = self._pretrained(data)
        if not callable(getattr(retriever, "item_embeddings", None)):
            raise ConfigError(f"p2rec.pretrained={p.pretrained!r} returned an object without item_embeddings()")
        item_emb = np.asarray(retriever.item_embeddings(), dtype=np.float32)
        if item_emb.ndim != 2 or item_emb.shape[0] != data.n_items:
            raise ConfigError(
                f"p2rec: {p.pretrained} item embeddings have shape {item_emb.shape}; expected [{data.n_items}, d]"
            )
        retr_notes = getattr(getattr(retriever, "ctx", None), "notes", {}) or {}
        notes["pretrained"] = {
            "method": p.pretrained, "source": source, "embedding_dim": int(item_emb.shape[1]),
            "notes": retr_notes.get(getattr(retriever, "name", p.pretrained) or p.pretrained),
        }
        t0 = time.perf_counter()
        km = kmeans(item_emb, k, seed=self.ctx.seed, n_init=p.kmeans_restarts, max_iter=p.kmeans_iters)
        self.labels = km.labels
        notes["kmeans_seconds"] = round(time.perf_counter() - t0, 3)
        notes["cluster_sizes"] = [int(c) for c in km.sizes()]
        notes["kmeans_inertia"] = float(km.inertia)

        # stage 1 -------------------------------------------------------------------------------
        device = resolve_device(self.ctx.device or "auto")
        t0 = time.perf_counter()
        self.llm: LLM | None = p.load_model(self.ctx)
        notes["llm"] = self.llm.name
        notes["llm_load_seconds"] = round(time.perf_counter() - t0, 2)
        self.template = TEMPLATES[p.prompt]
        self.texts = self._texts(data)
        history_len = int(p.history_len)
        self.train_users, self.valid_users = self._split_users(data, p.max_users, int(p.valid_users))
        examples = self._encode(data, self.train_users, history_len, k)
        valid_examples = self._encode(data, self.valid_users, history_len, k)
        self.targets = np.stack([t for _, t in examples])

        config = self._train_config()
        mean_g = self.targets.mean(0)
        head = nn.Linear(self.llm.model.config.hidden_size, k).to(self.llm.device, torch.float32)
        with torch.no_grad():
            head.weight.zero_()
            bias = mean_g if p.loss == "mse" else np.log(mean_g + 1e-6)
            head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        model = prepare_model(self.llm.model, config)
        model.p2rec_head = head  # a submodule: trained, checkpointed and restored with the adapters
        validate = None
        if p.early_stopping == "mse" and not self._single_validation(config, len(examples)):
            validate = self._validator(valid_examples, head)
        extra = "|".join([
            "p2rec-v1", self.llm.path, p.prompt, p.item_repr, p.item_text, p.pooling, p.head_norm, p.loss,
            p.target_items, str(history_len), p.early_stopping, data.fingerprint, _examples_hash(examples),
            _examples_hash(valid_examples) if validate else "",
        ])
        model, self.result = train(
            model, examples, config, pad_id=self.llm.pad_id, work_dir=self.ctx.work_dir, validate=validate,
            fingerprint_extra=extra, collate_fn=collate_examples,
            loss_fn=lambda m, batch: (distribution_loss(head_predictions(m, head, batch, p.pooling, p.head_norm),
                                                      batch["targets"], p.loss).sum(), len(batch["targets"])),
            example_weight=lambda ex: 1.0,
        )
        result = self.result
        valid_mse = self._mse(model, head, valid_examples) if valid_examples else None
        const = mean_g if p.loss == "mse" else mean_g / mean_g.sum()
        valid_const = (float(np.mean([((const - t) ** 2).mean() for _, t in valid_examples]))
                       if valid_examples else None)
        weights_fp = _weights_hash(trainable_state(model))
        self.head = head.cpu()
        del model.p2rec_head
        self.llm.model = merge_for_inference(model, p.precision)
        del model
        notes.update({
            "train_users": int(len(examples)),
            "train_examples": int(len(examples)),  # one per user
            "instance_level_examples": int(sum(max(len(data.train[u]) - 1, 0) for u in range(data.n_users))),
            "valid_users": int(len(valid_examples)),
            "history_len": history_len,
            "epochs": int(p.epochs),
            "train_tokens_per_epoch": int(sum(len(ids) for ids, _ in examples)),
            # across every attempt that built the checkpoint (a resumed or only-loaded stage trains
            # few or no tokens in this process); None: an older checkpoint did not record them
            "tokens_processed": int(result.total_tokens) if result.total_tokens or not result.resumed_from else None,
            "tokens_this_process": int(result.tokens),
            "steps": result.steps,
            "best_step": result.best_step,
            "best_score": result.best_score,
            "stopped_early": result.stopped_early,
            "resumed_from": result.resumed_from,
            "train_seconds": round(result.total_seconds, 2),
            "prior_train_seconds": round(result.prior_seconds, 2),  # of attempts before a resume
            "valid_mse": valid_mse,
            "valid_mse_constant": valid_const,
        })

        # stage 2 -------------------------------------------------------------------------------
        item_prompts = prompt_ids_batch(self.llm, self.template, [[t] for t in self.texts])
        prompt_fp = hashlib.sha256(
            "|".join([weights_fp, extra, p.pooling, str(len(item_prompts)),
                      _examples_hash([(np.asarray(ids), np.zeros(0)) for ids in item_prompts])]).encode()
        ).hexdigest()[:16]
        cache_path = self.ctx.work_dir / "p2rec-item-embeddings" / f"{prompt_fp}.safetensors"
        prefix_len = {"n": 0}

        def compute() -> torch.Tensor:
            if p.prefix_cache:
                with autocast(self.llm.device, p.precision):
                    emb, prefix_len["n"] = embed_shared_prefix(
                        self.llm.model, item_prompts, pad_id=self.llm.pad_id, pooling=p.pooling,
                        batch_size=p.embed_batch_size, progress=self.ctx.progress,
                    )
                return emb
            return embed_batches(self.llm.model, item_prompts, pad_id=self.llm.pad_id, pooling=p.pooling,
                                 batch_size=p.embed_batch_size, progress=self.ctx.progress, desc="p2rec items")

        t0 = time.perf_counter()
        emb, cached = cached_item_embeddings(cache_path, compute)
        self.llm_embeddings = emb.float().cpu().numpy()
        notes.update({
            "embedding_seconds": round(time.perf_counter() - t0, 2),
            "embeddings_cached": bool(cached),
            "embedding_prompt_tokens": int(sum(len(x) for x in item_prompts)),
            "shared_prefix_tokens": int(prefix_len["n"]),
            "embedding_cache": str(cache_path),
            # every attempt's training (result.total_seconds), not only this process's
            "llm_stage_seconds": round(notes["llm_load_seconds"] + result.total_seconds
                                       + (time.perf_counter() - t0), 2),
        })
        self.llm = None  # serving uses the downstream model only: free the LLM before training it
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # downstream --------------------------------------------------------------------------------
        down_params = self._downstream_params(retriever)
        width = self._width(down_params, p.downstream)
        std = p.init_std or xavier_std(data.n_items, width)
        source = self.llm_embeddings
        if p.projection == "head":  # the head reads what it was trained on
            source = head_input(torch.from_numpy(source), p.head_norm).numpy()
        projected = project_embeddings(
            source, width, method=p.projection, seed=self.ctx.seed, target_std=std,
            head_weight=self.head.weight.detach().numpy(), head_bias=self.head.bias.detach().numpy(),
        )
        if p.init == "add":
            rng = np.random.default_rng([self.ctx.seed, 7])
            projected = (projected + rng.normal(scale=xavier_std(data.n_items, width),
                                                size=projected.shape)).astype(np.float32)
        self.init_embeddings = projected
        down_ctx = dataclasses.replace(self.ctx, notes={}, work_dir=self.ctx.work_dir / "downstream")
        self.downstream = self._down_cls(down_params, down_ctx)
        self.downstream.set_initial_item_embeddings(projected)
        t0 = time.perf_counter()
        self.downstream.fit(data)
        notes.update({
            "projection": p.projection,
            "init": p.init,
            "init_std": float(std),
            "downstream": {
                "method": p.downstream,
                "width": width,
                "train_seconds": round(time.perf_counter() - t0, 2),
                "notes": down_ctx.notes.get(p.downstream, down_ctx.notes or None),
            },
        })
        self.ctx.notes["p2rec"] = notes

    def rank(self, request: RankRequest) -> RankedLists:
        if self.downstream is None:
            raise ConfigError("p2rec: rank() called before fit(); fit the method first")
        with cpu_threads(self.params.num_threads):
            ranked = self.downstream.rank(request)
        ranked.info.update({"method": "p2rec", "downstream": self.params.downstream,
                            "projection": self.params.projection, "init": self.params.init})
        cost = self.ctx.notes.get("p2rec") or {}
        if cost:
            ranked.info["leaderboard_note"] = leaderboard_note(cost, self.params)
        return ranked

