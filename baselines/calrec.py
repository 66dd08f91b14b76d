"""CALRec: contrastive alignment of a generative LLM for sequential recommendation.

Li et al., "CALRec: Contrastive Alignment of Generative LLMs for Sequential
Recommendation", RecSys 2024 (arXiv 2405.02429). No public code; the method details below
come from the sourced notes in ``shared/papers/calrec.md`` (tags [S1]..[S11] refer to
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

Two stages [S1, S2, S3, S5]: stage 1 fine-tunes on a mixture of domains, stage 2 on the
target domain starting from stage 1's weights. `stage1="ml-1m,synthetic"` names the stage-1
datasets (loaded by the runner under this run's protocol; empty = no stage 1, the default).
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
the bundled SmolLM2-135M-Instruct), LoRA by default as SFT (`lora=false` for full
fine-tuning as the paper). lr, steps and batch size are not reported: SFT's defaults,
batch 8 (in-batch negatives need at least 2).

Inference (`inference=`):

- "bm25" (the paper's quasi-round-robin retrieval [S4, S5, S6; mechanics S7]): sample
  `n_samples` generations at `temperature` (plain temperature sampling, no top-k/top-p),
  order them by the model's log-probability (`sample_order="logprob"`; the paper's order is
  not reported, "sample" keeps sampling order), retrieve each one's BM25 list over the
  catalog item texts (bm25s, k1/b defaults 1.5/0.75; S10: the paper found a k1/b search
  not critical), and interleave the lists round-robin, skipping repeats, seen items and
  non-candidates (`benchmark.grounding.ground_bm25`). Items that share no word with a
  generation are not retrieved; rows left shorter than k are filled with the most popular
  training items (`backfill="popularity"`, or "none" to PAD-fill; info reports how many).
  N, temperature and list depth are not reported: 8 samples on CPU, 16 on CUDA (notes
  suggest 8-32), temperature 0.7.
- "dense" (not in the paper as far as the notes reach; the two-tower embeddings used
  directly): v_U of the prompt vs v_T of every catalog item, cosine, top-k without seen
  and non-candidate items. Catalog embeddings are computed in batches once per trained
  weights and cached in ctx.work_dir/item_embeddings/ under a fingerprint of the weights,
  the item texts and the pooling.

Device-dependent defaults ("auto"), as SFT: on CUDA every stage-2 training position,
65,536 stage-1 examples, 512 validation users, 16 samples; on CPU 256 stage-2 and 256
stage-1 examples, 32 validation users, 8 samples. bf16 autocast on CUDA.

Reported in ctx.notes["calrec"]: inference mode, examples / steps / train seconds per
stage, catalog embedding seconds and whether they came from the cache (dense).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines.sft import _auto_int, cpu_threads, exclusions, history_texts
from benchmark.errors import ConfigError
from benchmark.llm.contrastive import DIRECTIONS, info_nce, span_mean, text_groups
from benchmark.llm.loading import LLM, load_llm, resolve_device
from benchmark.llm.pooling import batch_ids, cached_item_embeddings, embed_batches, last_hidden, pooled_hidden
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
from benchmark.llm.training import (
    TrainConfig,
    TrainResult,
    cap_examples,
    head_logits,
    label_positions,
    merge_for_inference,
    prepare_model,
    sequence_examples,
    train,
)
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

# (input_ids, labels, user_start, prompt_len, item_ids): the factual sequence prompt + target
# + eos with SFT's labels; v_U pools [user_start, prompt_len), v_T|U pools
# [prompt_len, prompt_len + len(item_ids)); the item tower reads item_ids alone.
CALRecExample = tuple[np.ndarray, np.ndarray, int, int, np.ndarray]


def _auto(value: Any, name: str, auto: int | None, allow_all: bool = False) -> int | None:
    return _auto_int(value, name, auto, allow_all=allow_all, method="calrec")


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


@dataclass
class CALRecParams:
    """Hyperparameters; see the module docstring for each default's source."""

    llm: str | None = None  # None: --llm (ctx.llm), else the bundled SmolLM2-135M-Instruct
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    item_text: str = "title_year"
    prompt: str = "movie"  # "movie" | "generic" (SFT's prompts) | "calrec" (the paper's layout, S3)
    history_len: int = 10
    user_pooling: str = "history"  # "history" | "prompt": which prompt tokens v_U averages
    # loss
    nig_weight: float = 1.0
    tt_weight: float = 0.5
    ut_weight: float = 0.5
    tau: float = 0.05  # contrastive temperature (cosine / tau)
    contrastive: str = "both"  # "q2k" (user->item) | "k2q" (item->user, S7's formula) | "both"
    # training (stage 2 = target domain)
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lr: float | None = None  # None: 3e-4 with LoRA, 3e-5 full fine-tuning
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    max_train_examples: str = "auto"  # auto: 256 on CPU, all on CUDA
    early_stopping: str = "loss"  # "loss" (CALRec loss on validation users) | "ndcg" | "none"
    valid_users: str = "auto"  # auto: 32 on CPU, 512 on CUDA
    eval_every: int = 0  # optimizer steps between validations; 0 = once per epoch
    patience: int = 3
    # stage 1 (mixture of domains)
    stage1: str = ""  # comma list of dataset specs; empty = no stage 1
    stage1_include_target: bool = True
    stage1_max_examples: str = "auto"  # auto: 256 on CPU, 65,536 on CUDA; "all"
    stage1_epochs: int = 1
    stage1_lr: float | None = None  # None: lr
    stage1_max_steps: int | None = None
    # inference
    inference: str = "bm25"  # "bm25" | "dense"
    n_samples: str = "auto"  # generations per user (bm25): auto = 16 on CUDA, 8 on CPU
    temperature: float = 0.7  # sampling temperature (bm25); 0 = greedy
    sample_order: str = "logprob"  # "logprob" | "sample": order in which lists are interleaved
    max_new_tokens: int = 32
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    backfill: str = "popularity"  # "popularity" | "none": fill rows BM25 leaves short
    eval_batch_size: int = 8  # users per generation batch
    embed_batch_size: int = 64  # texts per embedding batch (dense)
    num_threads: int = 0  # torch CPU threads during fit/rank (restored after); 0 leaves torch's setting

    def __post_init__(self) -> None:
        choices = {
            "item_text": ITEM_TEXT_STYLES, "prompt": tuple(PROMPTS), "user_pooling": ("history", "prompt"),
            "contrastive": DIRECTIONS, "early_stopping": ("loss", "ndcg", "none"),
            "inference": INFERENCE_MODES, "sample_order": ("logprob", "sample"), "backfill": ("popularity", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.history_len < 1:
            raise ValueError("history_len must be at least 1")
        if self.tau <= 0:
            raise ValueError("tau must be positive")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if min(self.nig_weight, self.tt_weight, self.ut_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.nig_weight + self.tt_weight + self.ut_weight == 0:
            raise ValueError("at least one loss weight must be positive")
        if (self.tt_weight or self.ut_weight) and self.batch_size < 2:
            raise ValueError("the contrastive losses use in-batch negatives: batch_size must be at least 2")

    def resolved(self, device: torch.device) -> dict[str, int | None]:
        gpu = device.type == "cuda"
        return {
            "max_train_examples": _auto(self.max_train_examples, "max_train_examples", None if gpu else 256,
                                        allow_all=True),
            "stage1_max_examples": _auto(self.stage1_max_examples, "stage1_max_examples", 65536 if gpu else 256,
                                         allow_all=True),
            "valid_users": _auto(self.valid_users, "valid_users", 512 if gpu else 32, allow_all=True),
            "n_samples": _auto(self.n_samples, "n_samples", 16 if gpu else 8),
        }

    @property
    def contrastive_on(self) -> bool:
        return bool(self.tt_weight or self.ut_weight)


# -- training batches and loss ---------------------------------------------------------------


def calrec_collate(
    examples: Sequence[CALRecExample], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-padded factual rows (input_ids, attention_mask, labels), the pooling spans, the
    item-tower rows (item_input_ids, item_attention_mask) and duplicate-text groups."""
    width = max(len(ex[0]) for ex in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, (x, y, _, _, _) in enumerate(examples):
        ids[row, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        labels[row, : len(y)] = torch.as_tensor(np.asarray(y, dtype=np.int64))
        mask[row, : len(x)] = 1
    items = batch_ids([list(map(int, ex[4])) for ex in examples], pad_id, device)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "user_start": torch.tensor([int(ex[2]) for ex in examples], device=device),
        "prompt_len": torch.tensor([int(ex[3]) for ex in examples], device=device),
        "target_end": torch.tensor([int(ex[3]) + len(ex[4]) for ex in examples], device=device),
        "item_input_ids": items["input_ids"],
        "item_attention_mask": items["attention_mask"],
        "groups": text_groups([ex[4] for ex in examples]).to(device),
    }


def calrec_terms(
    model: Any, batch: dict[str, torch.Tensor], *, tau: float, direction: str = "both",
    tt: bool = True, ut: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-example losses [b]: "nig" (mean token CE of the target), "tt" and "ut" (InfoNCE)."""
    hidden = last_hidden(model, batch["input_ids"], batch["attention_mask"])
    b = hidden.shape[0]
    label_mask, targets = label_positions(batch["labels"])
    rows = label_mask.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(head_logits(model, hidden[:, :-1][label_mask]).float(), targets, reduction="none")
    counts = torch.bincount(rows, minlength=b).clamp(min=1).to(ce.dtype)
    terms = {"nig": torch.zeros(b, device=ce.device, dtype=ce.dtype).index_add(0, rows, ce) / counts}
    if tt or ut:
        v_t = pooled_hidden(model, batch["item_input_ids"], batch["item_attention_mask"], "mean")
        if ut:
            v_u = span_mean(hidden, batch["user_start"], batch["prompt_len"])
            terms["ut"] = info_nce(v_u, v_t, tau, groups=batch["groups"], direction=direction, reduction="none")
        if tt:
            v_tu = span_mean(hidden, batch["prompt_len"], batch["target_end"])
            terms["tt"] = info_nce(v_tu, v_t, tau, groups=batch["groups"], direction=direction, reduction="none")
    return terms


def calrec_loss(model: Any, batch: dict[str, torch.Tensor], p: CALRecParams) -> tuple[torch.Tensor, int]:
    """(sum over the batch's examples of the weighted per-example loss, number of examples)."""
    terms = calrec_terms(model, batch, tau=p.tau, direction=p.contrastive, tt=p.tt_weight > 0, ut=p.ut_weight > 0)
    loss = p.nig_weight * terms["nig"]
    if "tt" in terms:
        loss = loss + p.tt_weight * terms["tt"]
    if "ut" in terms:
        loss = loss + p.ut_weight * terms["ut"]
    return loss.sum(), int(loss.shape[0])


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- temperature sampling ------------------------------------------------------------------------


@torch.inference_mode()
def sample_generations(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n_samples: int,
    temperature: float,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[list[tuple[list[int], float]]]:
    """`n_samples` temperature samples per prompt: (token ids without eos, model log-prob).

    The prompt runs once per user; its KV cache is repeated for the user's samples. Tokens
    are drawn from softmax(logits / temperature) (temperature 0: greedy); the returned
    log-prob is the model's own (untempered) sequence log-probability including eos.
    Seeded with a torch.Generator on the model's device; bf16 autocast on CUDA.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError("n_samples and max_new_tokens must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    order = np.argsort([-len(p) for p in prompt_ids], kind="stable")
    results: list[list[tuple[list[int], float]]] = [[] for _ in prompt_ids]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with _autocast(device):
        for chunk in tqdm(batches, desc="sample", disable=not progress, dynamic_ncols=True):
            prompts = [list(prompt_ids[int(i)]) or [eos_id] for i in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(prompts):  # left padding
                ids[r, width - len(p) :] = torch.as_tensor(p)
                mask[r, width - len(p) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            plen = mask.sum(1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                        past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_samples)
            logits = out.logits[:, -1, :].float().repeat_interleave(n_samples, 0)
            mask = mask.repeat_interleave(n_samples, 0)
            positions = plen.repeat_interleave(n_samples)
            rows = logits.shape[0]
            done = torch.zeros(rows, dtype=torch.bool, device=device)
            logp = torch.zeros(rows, device=device)
            tokens: list[torch.Tensor] = []
            for step in range(max_new_tokens):
                log_probs = torch.log_softmax(logits, -1)
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, -1)
                    nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
                else:
                    nxt = logits.argmax(-1)
                logp = logp + torch.where(done, torch.zeros_like(logp), log_probs.gather(1, nxt[:, None])[:, 0])
                nxt = torch.where(done, torch.full_like(nxt, int(pad_id)), nxt)
                tokens.append(nxt)
                done = done | (nxt == eos_id)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], 1)
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=(positions + step)[:, None],
                            past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1, :].float()
            seqs = torch.stack(tokens, 1).cpu().numpy()
            scores = logp.cpu().numpy()
            for b, i in enumerate(chunk):
                user = []
                for j in range(b * n_samples, (b + 1) * n_samples):
                    seq = seqs[j].tolist()
                    seq = seq[: seq.index(eos_id)] if eos_id in seq else seq
                    user.append((seq, float(scores[j])))
                results[int(i)] = user
    model.train(was_training)
    return results


# -- the method ------------------------------------------------------------------------------------


def _single_validation(config: TrainConfig, n_examples: int) -> bool:
    steps_per_epoch = max(1, math.ceil(math.ceil(n_examples / config.batch_size) / config.grad_accum))
    total = config.max_steps or steps_per_epoch * config.epochs
    return total <= (config.eval_every or steps_per_epoch)


@register_method("calrec")
class CALRec(Method):
    """One LLM as user and item tower: generation + two in-batch contrastive losses, two stages."""

    Params = CALRecParams
    uses_llm = True

    @classmethod
    def check_params(cls, params: CALRecParams) -> None:
        from benchmark.data import check_dataset

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
        self.results: dict[str, TrainResult] = {}
        self._bm25 = None
        self._prefix_ids: list[int] | None = None

    # -- setup -------------------------------------------------------------------------------
    def _load(self) -> LLM:
        p = self.params
        return load_llm(p.llm or self.ctx.llm, dtype=p.dtype, device=resolve_device(self.ctx.device or "auto"))

    def train_config(self, device: torch.device, stage: int) -> TrainConfig:
        p = self.params
        auto = p.resolved(device)
        first = stage == 1
        return TrainConfig(
            lr=(p.stage1_lr if p.stage1_lr is not None else p.lr) if first else p.lr,
            epochs=p.stage1_epochs if first else p.epochs,
            batch_size=p.batch_size,
            grad_accum=p.grad_accum,
            max_steps=p.stage1_max_steps if first else p.max_steps,
            eval_every=0 if first else p.eval_every,
            patience=0 if first or p.early_stopping == "none" else p.patience,
            seed=self.ctx.seed,
            max_train_examples=auto["stage1_max_examples" if first else "max_train_examples"],
            lora=p.lora,
            lora_r=p.lora_r,
            lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            progress=self.ctx.progress,
        )

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
            with torch.no_grad(), _autocast(device):
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

    def _stage1_pools(self, data: TrainData, specs: list[str]) -> tuple[list, list[str]]:
        if self.ctx.dataset_loader is None:
            raise ConfigError("calrec.stage1 needs other datasets, but this run context has no dataset loader")
        pools, names = [], []
        if self.params.stage1_include_target:
            pools.append((data.train, self.texts))
            names.append(f"{data.dataset}:{data.fingerprint}")
        for spec in specs:
            split = self.ctx.dataset_loader(spec)
            if split.fingerprint == data.fingerprint:
                continue  # the target domain itself: included (or not) by stage1_include_target
            pools.append((split.train, catalog_texts(split.catalog, self.params.item_text)))
            names.append(f"{split.dataset}:{split.fingerprint}")
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

        # stage 1: mixture of domains
        stage1_fp = ""
        specs = parse_specs(p.stage1)
        if specs:
            config1 = self.train_config(device, stage=1)
            pools, names = self._stage1_pools(data, specs)
            examples1 = self._domain_examples(pools, config1.max_train_examples)
            self.n_stage1 = len(examples1)
            extra1 = f"calrec-stage1|{common}|{';'.join(names)}"
            model = prepare_model(model, config1)
            stage1_dir = self._stage_dir("stage1", config1.fingerprint(len(examples1), extra1))
            model, res1 = train(model, examples1, config1, pad_id=self.llm.pad_id, work_dir=stage1_dir,
                                fingerprint_extra=extra1, **hooks)
            self.results["stage1"] = res1
            stage1_fp = config1.fingerprint(len(examples1), extra1)
            model = merge_for_inference(model)  # stage 2 starts from these weights (fresh adapters)
            notes["stage1"] = {"datasets": names, "examples": len(examples1), "steps": res1.steps,
                               "resumed_from": res1.resumed_from, "train_seconds": round(res1.seconds, 2)}

        # stage 2: the target domain
        config2 = self.train_config(device, stage=2)
        examples = self._domain_examples([(data.train, self.texts)], config2.max_train_examples)
        self.n_train = len(examples)
        validate = None
        rows = self._valid_rows(data, p.resolved(device)["valid_users"])
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
        self.llm.model = merge_for_inference(model)
        self.weights_fingerprint = self._fingerprint(config2.fingerprint(len(examples), extra2), data.fingerprint)
        notes["stage2"] = {"examples": len(examples), "steps": res2.steps, "best_step": res2.best_step,
                           "best_score": res2.best_score, "stopped_early": res2.stopped_early,
                           "resumed_from": res2.resumed_from, "train_seconds": round(res2.seconds, 2)}
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
        with cpu_threads(self.params.num_threads):
            return self._rank(request)

    def _rank(self, request: RankRequest) -> RankedLists:
        if self.llm is None:
            raise ConfigError("calrec: rank() called before fit()")
        p = self.params
        ranked = self._rank_with(self.llm.model, request, progress=self.ctx.progress, cache=True)
        info: dict[str, Any] = {"inference": p.inference, "llm": self.llm.name, "train_examples": self.n_train,
                                "stage1_examples": self.n_stage1, "item_text": p.item_text}
        if p.inference == "bm25":
            info.update(n_samples=self._n_samples(), temperature=p.temperature, backfill=p.backfill)
        stage1 = f"stage 1 on {p.stage1} ({self.n_stage1} examples)" if self.n_stage1 else "no stage 1"
        mode = (f"BM25 over {self._n_samples()} sampled generations (T={p.temperature:g}), round-robin"
                if p.inference == "bm25" else "dense user-tower retrieval")
        info["leaderboard_note"] = (f"{self.llm.name}, {self.n_train} training examples, {stage1}; inference: {mode}"
                                    + (f"; {ranked.info['backfilled_users']} users backfilled by popularity"
                                       if ranked.info.get("backfilled_users") else ""))
        ranked.info.update(info)
        self.ctx.notes.setdefault("calrec", {})["inference"] = p.inference
        short = int((ranked.items == PAD).any(axis=1).sum())
        if short:
            ranked.info["note"] = (f"{short} of {len(ranked.users)} users got fewer than k={request.k} items; "
                                   "their lists are PAD-filled")
        return ranked

    def _n_samples(self) -> int:
        return int(self.params.resolved(self.llm.device)["n_samples"])

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
            model, prompts, n_samples=self._n_samples(), temperature=p.temperature, max_new_tokens=p.max_new_tokens,
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
        filled = 0
        for row, ids in enumerate(ranked_ids):
            ids = list(np.asarray(ids, dtype=np.int64)[:k])
            if len(ids) < k and p.backfill == "popularity":
                ids, added = self._backfill(ids, exclude[row], k)
                filled += added > 0
            items[row, : len(ids)] = ids
        ranked = RankedLists(users=np.asarray(request.users).copy(), items=items, extras={"valid": valid})
        ranked.info["backfilled_users"] = int(filled)
        return ranked

    def _backfill(self, ids: list[int], exclude: np.ndarray, k: int) -> tuple[list[int], int]:
        """Append the most popular training items not excluded and not already listed."""
        taken = set(int(i) for i in ids) | set(int(i) for i in np.asarray(exclude).reshape(-1))
        added = 0
        for item in self.popularity:
            if len(ids) >= k:
                break
            if int(item) not in taken:
                ids.append(int(item))
                taken.add(int(item))
                added += 1
        return ids, added
