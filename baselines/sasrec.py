"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A causal transformer reads a user's item sequence; the hidden state at each position is
scored against the (shared) item embedding table to predict the next item.

Two training losses:

- ``loss="ce"`` (default): full-softmax cross-entropy over the whole catalog at every
  position, as in Klenitskiy & Vasilev (RecSys 2023), "Turning Dross Into Gold Loss: is
  BERT4Rec really better than SASRec?" -- this is what makes SASRec a strong baseline.
- ``loss="bce"``: the original objective, binary cross-entropy with one uniformly
  sampled negative per position.

Defaults (recipe version 2) are Klenitskiy & Vasilev's SASRec+ recipe, read from their code
(antklen/sasrec-bert4rec-recsys23), each value with its source in `SASRecParams`. The
harness's earlier defaults (pre-LN block, lr 2e-3, batch 64, length-bucketed batches) are
the `sasrec_v1` preset. Recipe version 2 also stops training on the first item of rows
shorter than their batch (it was predicted from a padding position).

Model selection is early stopping on validation NDCG@10 through ``ctx.validate``; the best
state dict is kept. Item ids are shifted by one inside the model so that 0 is padding.

Determinism: parameter init and dropout draw from torch's RNG inside ``torch.random.fork_rng``
seeded from ``ctx.seed`` (the caller's global RNG state is restored afterwards); shuffling
and negative sampling use a numpy Generator seeded from ``ctx.seed``. On CPU two fits with
the same seed give byte-identical rankings.

An optional ``[n_items, hidden]`` array initialises the item embedding table (P2Rec feeds
LLM-derived item embeddings this way): pass ``init_item_embeddings=`` to the constructor or
call ``set_initial_item_embeddings(arr)`` before ``fit``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmark.config import params_key
from benchmark.errors import ConfigError
from benchmark.hparams import fields_with_role, hp
from benchmark.manifest import resolve_device
from benchmark.ranking import rank_by_scores
from benchmark.registry import Method, RunContext, register_method
from benchmark.store import umask_mode
from benchmark.types import CandidateSet, RankedLists, RankRequest, TrainData


class EmbeddingShapeError(ConfigError, ValueError):
    """The initial item embeddings do not match [n_items, hidden]."""


KV = "antklen/sasrec-bert4rec-recsys23@29c272e"


@dataclass
class SASRecParams:
    """Klenitskiy & Vasilev's SASRec+ recipe (RecSys 2023), each value with its source.

    Their code builds on pmixer/SASRec.pytorch and trains with full-softmax cross-entropy;
    it reports NDCG@10 0.1821 / HR@10 0.3152 on ML-1M (leave-one-out, full ranking).
    """

    hidden: int = hp(64, ge=1, source=f"{KV} src/configs/SASRec.yaml:19 hidden_units: 64")
    blocks: int = hp(2, ge=1, source=f"{KV} src/configs/SASRec.yaml:20 num_blocks: 2")
    heads: int = hp(1, ge=1, source=f"{KV} src/configs/SASRec.yaml:21 num_heads: 1")
    dropout: float = hp(0.1, ge=0, lt=1, source=f"{KV} src/configs/SASRec.yaml:22 dropout_rate: 0.1")
    max_len: int = hp(200, ge=1, source=f"{KV} src/run_final.sh:2 dataset.max_length=200 (MovieLens); "
                                        "SASRec.yaml:18 maxlen: 200")
    loss: str = hp("ce", choices=("ce", "bce"), source=f"{KV} src/modules.py full-softmax cross-entropy "
                                                       "(full_negative_sampling: False, SASRec.yaml:8)")
    lr: float = hp(1e-3, gt=0, source=f"{KV} src/configs/SASRec.yaml:25 lr: 0.001")
    batch_size: int = hp(128, ge=1, source=f"{KV} src/configs/SASRec.yaml:11 batch_size: 128")
    epochs: int = hp(100, ge=1, source=f"{KV} src/configs/SASRec.yaml:31 max_epochs: 100")
    patience: int = hp(10, ge=1, source=f"{KV} src/configs/SASRec.yaml:33 patience: 10 on val_ndcg (run.py:140)")
    eval_every: int = hp(1, ge=1, source=f"{KV} src/run.py:140 validation every epoch")
    weight_decay: float = hp(0.0, ge=0, source=f"{KV} src/modules.py:26 torch.optim.Adam defaults")
    adam_beta2: float = hp(0.999, ge=0, lt=1, source=f"{KV} src/modules.py:26 torch.optim.Adam defaults")
    init_std: float = hp(0.02, ge=0, source=f"{KV} src/models.py:62 initializer_range=0.02; 0 = xavier-normal")
    block: str = hp("pmixer", choices=("preln", "pmixer"),
                    source=f"{KV} src/models.py (pmixer/SASRec.pytorch block); preln: a textbook pre-LN block")
    positions: str = hp("start", choices=("end", "start"),
                        source=f"{KV} src/datasets.py right padding: the window's first item is position 0")
    batching: str = hp("shuffle", choices=("bucket", "shuffle"),
                       source=f"{KV} src/run.py DataLoader(shuffle=True); bucket: length-bucketed batches")
    scale_embeddings: bool = hp(True, source=f"{KV} src/models.py seqs *= hidden_units ** 0.5 (pmixer)")
    amp: bool = hp(False, source=f"{KV} src/run.py:148 pl.Trainer default precision 32; true: bf16 autocast on CUDA")
    device: str = hp("auto", role="harness")  # "auto" = ctx.device; or "cpu"/"cuda"
    num_threads: int = hp(0, ge=0, role="harness")  # torch intra-op threads during fit/rank; 0 leaves torch's default
    eval_batch_size: int = hp(512, ge=1, role="harness")
    max_train_seconds: float = hp(0.0, ge=0)  # stop after the first epoch ending past this budget (0 = no limit)

    def __post_init__(self) -> None:
        if self.heads > 0 and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor, dropout: float
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of [B, L, d] projections under `mask`; returns [B, L, d]."""
    b, length, d = q.shape
    shape = (b, length, heads, d // heads)
    q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
    att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return att.transpose(1, 2).reshape(b, length, d)


class _Block(nn.Module):
    """Pre-LN transformer block: causal self-attention and a position-wise feed-forward."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff1 = nn.Linear(hidden, hidden)
        self.ff2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).split(x.shape[-1], dim=-1)
        att = _causal_attention(q, k, v, self.heads, attn_mask, self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att))
        h = self.ff2(self.drop(F.gelu(self.ff1(self.norm2(x)))))
        return x + self.drop(h)


class _PmixerBlock(nn.Module):
    """The block of pmixer/SASRec.pytorch (and of Klenitskiy & Vasilev's SASRec+).

    q = LN1(x); x = q + Attn(q, x, x); x = LN2(x); x = x + FFN(x), FFN = dropout(W2 dropout(relu(W1 x))).
    The residuals start from normalised states, unlike a textbook pre-LN block.
    """

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(hidden, eps=1e-8)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-8)
        self.ff1 = nn.Linear(hidden, hidden)
        self.ff2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        k, v = self.kv(x).split(x.shape[-1], dim=-1)
        att = _causal_attention(self.q(normed), k, v, self.heads, attn_mask, self.dropout if self.training else 0.0)
        x = self.norm2(normed + self.proj(att))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(x)))))


class SASRecModel(nn.Module):
    """Item sequence [B, L] (0 = padding, items 1..n_items, left-padded) -> hidden states [B, L, d]."""

    def __init__(self, n_items: int, p: SASRecParams):
        super().__init__()
        self.n_items = n_items
        self.max_len = p.max_len
        self.positions_from_start = p.positions == "start"
        self.scale = math.sqrt(p.hidden) if p.scale_embeddings else 1.0
        self.item_emb = nn.Embedding(n_items + 1, p.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(p.max_len, p.hidden)
        self.emb_drop = nn.Dropout(p.dropout)
        block = _PmixerBlock if p.block == "pmixer" else _Block
        self.blocks = nn.ModuleList(block(p.hidden, p.heads, p.dropout) for _ in range(p.blocks))
        self.final_norm = nn.LayerNorm(p.hidden)
        if p.init_std > 0:
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=p.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        else:
            nn.init.xavier_normal_(self.item_emb.weight)
            nn.init.xavier_normal_(self.pos_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        b, length = seq.shape
        real = seq > 0
        if self.positions_from_start:
            # the first real item of each (left-padded) row is position 0, as if right-padded
            pos = (torch.cumsum(real, dim=1) - 1).clamp(min=0)  # [B, L]
        else:
            # positions count back from the end of a max_len window, so the last item is always
            # position max_len-1 whatever the batch's padded length (as if padded to max_len)
            pos = torch.arange(self.max_len - length, self.max_len, device=seq.device).unsqueeze(0)
        x = self.item_emb(seq) * self.scale + self.pos_emb(pos)
        x = self.emb_drop(x) * real.unsqueeze(-1)
        causal = torch.ones((length, length), dtype=torch.bool, device=seq.device).tril()
        # a query sees earlier real items and always itself (so padded rows are never all-masked)
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)
        mask = (causal.unsqueeze(0) & real.unsqueeze(1)) | eye.unsqueeze(0)
        mask = mask.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.final_norm(x)

    def item_weights(self) -> torch.Tensor:
        """Output embeddings of the real items, [n_items, d] (row i = catalog item i)."""
        return self.item_emb.weight[1:]


def _left_pad(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Shifted (+1) items, last max_len of each, left-padded with 0 to the longest in the batch."""
    width = max(1, min(max_len, max((len(s) for s in seqs), default=1)))
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[row, width - len(s) :] = np.asarray(s, dtype=np.int64) + 1
    return out


def _shuffled_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """All n users in a random order, cut into batches (the last may be smaller)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length sequences (less padding), in shuffled order.

    Users are shuffled, cut into pools of 32 batches, each pool sorted by length (stable)
    and cut into batches; the batch order is shuffled again.
    """
    order = rng.permutation(len(lengths))
    pool = batch_size * 32
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@register_method("sasrec")
class SASRec(Method):
    """SASRec+ (Klenitskiy & Vasilev's recipe): full-softmax CE; ranks the whole catalog."""

    Params = SASRecParams
    RECIPE_VERSION: ClassVar[int] = 2
    REFERENCE: ClassVar[str] = f"{KV} (Klenitskiy & Vasilev, RecSys 2023; Kang & McAuley 2018)"

    @classmethod
    def check_params(cls, params: SASRecParams) -> None:
        if params.device != "auto":  # a device this machine lacks (or a typo) fails before any work
            resolve_device(params.device, option=f"{cls.name}.device")

    def __init__(self, params: SASRecParams, ctx: RunContext, init_item_embeddings: np.ndarray | None = None):
        super().__init__(params, ctx)
        self.model: SASRecModel | None = None
        self.n_items = 0
        self.history: list[dict[str, float]] = []
        self._init_emb: np.ndarray | None = None
        if init_item_embeddings is not None:
            self.set_initial_item_embeddings(init_item_embeddings)

    # ------------------------------------------------------------------ setup
    def set_initial_item_embeddings(self, arr: np.ndarray) -> None:
        """Use `arr` [n_items, hidden] as the initial item embedding table (checked again at fit)."""
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[1] != self.params.hidden:
            raise EmbeddingShapeError(
                f"initial item embeddings have shape {arr.shape}; expected [n_items, {self.params.hidden}] "
                f"(set sasrec.hidden to the embedding width or project the embeddings)"
            )
        if not np.isfinite(arr).all():
            raise EmbeddingShapeError("initial item embeddings contain NaN or inf values")
        self._init_emb = arr.astype(np.float32, copy=True)

    @property
    def device(self) -> torch.device:
        name = self.params.device if self.params.device != "auto" else (self.ctx.device or "auto")
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"sasrec device {name!r} requested but CUDA is not available; use --device cpu")
        return torch.device(name)

    def _autocast(self, device: torch.device):
        enabled = self.params.amp and device.type == "cuda"
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Apply params.num_threads for the duration of fit/rank, then restore torch's setting."""
        old = torch.get_num_threads()
        if self.params.num_threads > 0:
            torch.set_num_threads(self.params.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def build_model(self, n_items: int) -> SASRecModel:
        """A freshly initialised model (on CPU), its item table taken from the initial embeddings if set."""
        if self._init_emb is not None and self._init_emb.shape[0] != n_items:
            raise EmbeddingShapeError(
                f"initial item embeddings have {self._init_emb.shape[0]} rows but the catalog has "
                f"{n_items} items; build them for this split's catalog (internal id order)"
            )
        model = SASRecModel(n_items, self.params)
        if self._init_emb is not None:
            with torch.no_grad():
                model.item_emb.weight[1:].copy_(torch.from_numpy(self._init_emb))
        return model

    # ------------------------------------------------------------------ training
    def fit(self, data: TrainData) -> None:
        p = self.params
        device = self.device
        self.n_items = data.n_items
        if self._init_emb is not None and self._init_emb.shape[0] != data.n_items:
            self.build_model(data.n_items)  # raises the shape error before any work
        seqs = [np.asarray(s, dtype=np.int64)[-(p.max_len + 1) :] for s in data.train]
        seqs = [s for s in seqs if len(s) >= 2]
        if not seqs:
            raise ConfigError("sasrec: no training sequence has 2 or more items; nothing to learn from")
        cached = self._cache_path(data)
        if cached is not None and cached.is_file() and self._load_cached(cached, data.n_items, device):
            return
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        det_before = torch.are_deterministic_algorithms_enabled()
        with self._threads(), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(self.ctx.seed)
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
            try:
                self._fit(data, seqs, device)
            finally:
                torch.use_deterministic_algorithms(det_before)
        if cached is not None:
            self._save_cached(cached)

    # ------------------------------------------------------------------ fitted-model cache
    def _cache_path(self, data: TrainData) -> Path | None:
        """ctx.cache_dir/models/sasrec-<fingerprint>.pt: params that change training, seed, data, initial table."""
        if getattr(self.ctx, "cache_dir", None) is None:
            return None
        params = {k: v for k, v in params_key(self.params).items() if k not in fields_with_role(self.params, "harness")}
        init = None if self._init_emb is None else hashlib.sha256(self._init_emb.tobytes()).hexdigest()
        payload = {"params": params, "seed": self.ctx.seed, "data": data.fingerprint, "init": init,
                   "device": self.device.type, "version": 2}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return Path(self.ctx.cache_dir) / "models" / f"sasrec-{digest}.pt"

    def _save_cached(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt")
        os.fchmod(fd, umask_mode())  # mkstemp's 0600 -> what the umask allows
        os.close(fd)
        try:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            torch.save({"state": state, "history": self.history, "notes": self.ctx.notes.get("sasrec")}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load_cached(self, path: Path, n_items: int, device: torch.device) -> bool:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
            model = self.build_model(n_items)
            model.load_state_dict(saved["state"])
        except Exception:  # a damaged or stale cache entry: train instead
            return False
        self.model = model.to(device).eval()
        self.history = list(saved.get("history") or [])
        notes = dict(saved.get("notes") or {})
        notes["loaded_from"] = str(path)
        self.ctx.notes["sasrec"] = notes
        return True

    def _fit(self, data: TrainData, seqs: list[np.ndarray], device: torch.device) -> None:
        p = self.params
        rng = self.ctx.rng(17)
        model = self.build_model(data.n_items).to(device)
        self.model = model
        opt = torch.optim.Adam(model.parameters(), lr=p.lr, betas=(0.9, p.adam_beta2), weight_decay=p.weight_decay)
        valid = data.valid
        can_validate = len(valid) > 0 and self.ctx.validate is not None
        best_score, best_state, best_epoch, bad = -math.inf, None, 0, 0
        self.history = []
        start = time.perf_counter()
        lengths = np.array([len(x) for x in seqs])
        epoch, stopped_by = 0, "epochs"
        for epoch in range(1, p.epochs + 1):
            model.train()
            if p.batching == "shuffle":
                batches = _shuffled_batches(len(lengths), p.batch_size, rng)
            else:
                batches = _length_bucketed_batches(lengths, p.batch_size, rng)
            total, count = torch.zeros((), device=device), 0
            bar = tqdm(batches, desc=f"sasrec epoch {epoch}", leave=False, disable=not self.ctx.progress)
            for idx in bar:
                batch = [seqs[i] for i in idx]
                padded = torch.from_numpy(_left_pad(batch, p.max_len + 1)).to(device)
                inputs, targets = padded[:, :-1], padded[:, 1:]
                with self._autocast(device):
                    loss = self._loss(model, inputs, targets, rng)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().float()
                count += 1
                if self.ctx.progress and (count % 10 == 0 or count == len(batches)):
                    bar.set_postfix(loss=f"{float(total) / count:.4f}")  # syncs a GPU only every 10 steps
            bar.close()
            record: dict[str, float] = {"epoch": epoch, "loss": float(total) / max(count, 1)}
            if can_validate and epoch % p.eval_every == 0:
                score = self._validate(data)
                record["valid_ndcg@10"] = score
                if score > best_score:
                    best_score, best_epoch, bad = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad += 1
            record["seconds"] = time.perf_counter() - start
            self.history.append(record)
            if self.ctx.progress:
                tqdm.write(
                    f"sasrec epoch {epoch}: loss {record['loss']:.4f}"
                    + (f", valid ndcg@10 {record['valid_ndcg@10']:.4f}" if "valid_ndcg@10" in record else "")
                )
            if can_validate and bad >= p.patience:
                stopped_by = "early_stopping"
                break
            if p.max_train_seconds > 0 and record["seconds"] >= p.max_train_seconds:
                stopped_by = "max_train_seconds"
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        self.ctx.notes["sasrec"] = {
            "epochs_run": epoch,
            "best_epoch": best_epoch if best_state is not None else epoch,
            "best_valid_ndcg@10": best_score if best_state is not None else None,
            "train_seconds": time.perf_counter() - start,
            "stopped_by": stopped_by,
            "device": str(device),
        }

    def _loss(
        self, model: SASRecModel, inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator
    ) -> torch.Tensor:
        hidden = model(inputs)
        # a target counts only where its input is a real item: the first item of a row
        # shorter than the batch sits after a padding position and is never a target
        # (as in the reference, which trains on inputs seq[:-1] against labels seq[1:])
        real = (targets > 0) & (inputs > 0)
        h = hidden[real]  # [P, d]: only positions with a real input and a next item
        pos = targets[real]
        weights = model.item_emb.weight
        if self.params.loss == "ce":
            logits = h @ weights[1:].T  # [P, n_items]
            return F.cross_entropy(logits.float(), pos - 1)
        neg_np = rng.integers(1, self.n_items + 1, size=len(pos))
        neg = torch.from_numpy(neg_np).to(pos.device)
        if self.n_items > 1:  # redraw negatives that hit the positive (a few rounds suffice)
            for _ in range(8):
                clash = neg == pos
                if not bool(clash.any()):
                    break
                redraw = torch.from_numpy(rng.integers(1, self.n_items + 1, size=int(clash.sum()))).to(pos.device)
                neg[clash] = redraw
        pos_logit = (h * weights[pos]).sum(-1).float()
        neg_logit = (h * weights[neg]).sum(-1).float()
        return F.binary_cross_entropy_with_logits(
            pos_logit, torch.ones_like(pos_logit)
        ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))

    def _validate(self, data: TrainData) -> float:
        valid = data.valid
        request = RankRequest(
            users=valid.users,
            histories=valid.histories,
            candidates=CandidateSet(protocol="full", users=valid.users, items=None, exclude_seen=True),
            k=20,
            stage="valid",
        )
        ranked = self._rank(request)
        self.model.train()
        metrics = self.ctx.validate(ranked)
        if "ndcg@10" not in metrics:
            raise ConfigError("sasrec early stopping needs ctx.validate to return 'ndcg@10'")
        return float(metrics["ndcg@10"])

    # ------------------------------------------------------------------ ranking
    def _scores(self, histories: list[np.ndarray]) -> torch.Tensor:
        device = self.device
        seq = torch.from_numpy(_left_pad(list(histories), self.params.max_len)).to(device)
        with self._autocast(device):
            last = self.model(seq)[:, -1, :]
        # scores that rank are computed in fp32 (bf16 products tie, which reorders users' lists)
        return last.float() @ self.model.item_weights().float().T

    def _rank(self, request: RankRequest) -> RankedLists:
        self.model.eval()
        with torch.no_grad():
            return rank_by_scores(
                request,
                self.n_items,
                lambda users, histories: self._scores(histories),
                batch_size=self.params.eval_batch_size,
                device=self.device,
            )

    def rank(self, request: RankRequest) -> RankedLists:
        if self.model is None:
            raise ConfigError("sasrec: rank() called before fit(); fit the method first")
        with self._threads():
            ranked = self._rank(request)
        ranked.info.setdefault("method", "sasrec")
        return ranked

    def item_embeddings(self) -> np.ndarray:
        """The learned item embedding table [n_items, hidden] (float32, catalog id order)."""
        if self.model is None:
            raise ConfigError("sasrec: item_embeddings() called before fit()")
        return self.model.item_weights().detach().float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"history": list(self.history)}
