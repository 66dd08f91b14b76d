"""CFT: counterfactual fine-tuning with token-level weights (Zhang et al., arXiv 2410.22809).

"Causality-Enhanced Behavior Sequence Modeling in LLMs for Personalized Recommendation".
Implemented from the reference code (itsmeyjt/CFT, `train.py::CustomTrainer.compute_loss`),
whose prompts and scripts are not copied. The method, as that code does it:

- factual input: the SFT prompt with the user's history; counterfactual input: the same
  example with the history block removed (instruction and target stay);
- causal effect of the history on each target token: factual minus counterfactual logits
  at the aligned target positions, e_t = z_t(x_h) - z_t(x_0);
- loss = L_sft + alpha * L_effect, both token-weighted: L_effect is the cross-entropy of
  softmax(e_t) against the true token; weights fall linearly over the target tokens (item
  text + eos) from 1 on the first to beta on the last, are zero on the prompt, and both
  losses are normalised by the batch's total weight. Reference alpha = 0.1, beta = 0.25.
  Gradients flow through both branches (`detach=True` stops the counterfactual one).
- inference is SFT's (same prompt, same grounding), so any gain comes from training.

Recipe: SFT's (which is this recipe without the loss; see `baselines/sft.py`) plus
alpha 0.1, beta 0.25, linear weighting, gradients through both branches. The evaluation
loss used for early stopping is the token-weighted normal loss, as the reference computes
it when the model is not training.

Efficiency: one forward pass per batch. Factual rows are right-padded; the much shorter
counterfactual sequences are packed several to a row of the same width, with a
block-diagonal causal mask and restarted position ids, so almost no compute goes to
padding. Hidden states are taken only at target positions; because the output head is
linear (no bias), the effect logits are the head applied to the difference of the two
hidden states, so only two [n_target_tokens, vocab] logit tensors exist, never
[batch, seq, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines.sft import CFT_CODE, SFT, SFTParams, history_texts
from benchmark.hparams import hp
from benchmark.llm.prompts import IGNORE, encode_examples
from benchmark.llm.training import cap_examples, decoder_body, head_logits, lm_head, sequence_examples
from benchmark.registry import register_method
from benchmark.types import TrainData

WEIGHTINGS = ("linear", "none")

# (factual ids, factual labels, counterfactual ids, counterfactual labels)
CFTExample = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def token_weights(n: int, beta: float, scheme: str = "linear") -> np.ndarray:
    """Weights of n target tokens: 1 on the first falling linearly to beta on the last."""
    if scheme == "none" or n == 1:
        return np.ones(n, dtype=np.float32)
    return (1.0 - np.arange(n, dtype=np.float64) * (1.0 - beta) / (n - 1)).astype(np.float32)


def _label_positions(labels: np.ndarray) -> np.ndarray:
    """Indices (into the sequence) of the positions that *predict* a labelled token."""
    return np.flatnonzero(np.asarray(labels)[1:] != IGNORE)


def pack_batch(
    examples: Sequence[CFTExample],
    pad_id: int,
    device: torch.device | str = "cpu",
    *,
    beta: float = 0.25,
    weighting: str = "linear",
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """One tensor batch holding every factual row and the packed counterfactual rows.

    Returns input_ids / position_ids [R, W], an additive 4D mask [R, 1, W, W] (block-diagonal
    causal; padding attends to itself only), the flat indices (into R*W) of the positions
    predicting each target token for the factual (f_index) and counterfactual (c_index)
    copies in the same order, the targets, their weights, and attention_mask [R, W] (1 on
    real tokens) for token counting.
    """
    width = max(max(len(f), len(c)) for f, _, c, _ in examples)
    n = len(examples)
    # first-fit packing of the counterfactual sequences into rows of `width`
    cf_rows: list[list[int]] = []
    fill: list[int] = []
    placement: list[tuple[int, int]] = []
    for i, (_, _, c_ids, _) in enumerate(examples):
        for r, used in enumerate(fill):
            if used + len(c_ids) <= width:
                placement.append((r, used))
                fill[r] += len(c_ids)
                cf_rows[r].append(i)
                break
        else:
            placement.append((len(fill), 0))
            fill.append(len(c_ids))
            cf_rows.append([i])
    rows = n + len(fill)
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    pos = np.zeros((rows, width), dtype=np.int64)
    seg = np.full((rows, width), -1, dtype=np.int64)  # segment id per token; -1 = padding
    f_index, c_index, targets, weights = [], [], [], []
    for i, (f_ids, f_lab, c_ids, c_lab) in enumerate(examples):
        lf, lc = len(f_ids), len(c_ids)
        ids[i, :lf] = f_ids
        pos[i, :lf] = np.arange(lf)
        seg[i, :lf] = 0
        r, off = placement[i]
        ids[n + r, off : off + lc] = c_ids
        pos[n + r, off : off + lc] = np.arange(lc)
        seg[n + r, off : off + lc] = i
        fp, cp = _label_positions(f_lab), _label_positions(c_lab)
        f_t, c_t = np.asarray(f_lab)[fp + 1], np.asarray(c_lab)[cp + 1]
        if len(fp) != len(cp) or not np.array_equal(f_t, c_t):
            raise ValueError(f"example {i}: factual and counterfactual targets differ")
        f_index.append(i * width + fp)
        c_index.append((n + r) * width + off + cp)
        targets.append(f_t)
        weights.append(token_weights(len(fp), beta, weighting))
    same = seg[:, :, None] == seg[:, None, :]
    causal = np.tril(np.ones((width, width), dtype=bool))[None]
    allowed = (same & causal & (seg[:, :, None] >= 0)) | np.eye(width, dtype=bool)[None]
    mask = torch.zeros((rows, 1, width, width), dtype=mask_dtype)
    mask.masked_fill_(~torch.from_numpy(allowed)[:, None], torch.finfo(mask_dtype).min)
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "position_ids": torch.from_numpy(pos).to(device),
        "attn4d": mask.to(device),
        "attention_mask": torch.from_numpy(seg >= 0).long().to(device),
        "f_index": torch.from_numpy(np.concatenate(f_index)).to(device),
        "c_index": torch.from_numpy(np.concatenate(c_index)).to(device),
        "targets": torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(device),
        "weights": torch.from_numpy(np.concatenate(weights)).to(device),
    }


def _linear_head(model: Any) -> bool:
    head = lm_head(model)
    cfg = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    no_scale = scale is None or not isinstance(scale, (int, float)) or scale == 1
    return isinstance(head, torch.nn.Linear) and head.bias is None and not softcap and no_scale


def cft_loss(model: Any, batch: dict[str, torch.Tensor], *, alpha: float, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss sum, total weight) of one packed batch; divide for the mean."""
    out = decoder_body(model)(
        input_ids=batch["input_ids"],
        attention_mask=batch["attn4d"].to(next(model.parameters()).dtype)
        if batch["attn4d"].is_floating_point() else batch["attn4d"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    h_f = flat[batch["f_index"]]
    h_c = flat[batch["c_index"]]
    if detach:
        h_c = h_c.detach()
    targets, w = batch["targets"], batch["weights"]
    logits_f = head_logits(model, h_f)
    loss = (w * F.cross_entropy(logits_f.float(), targets, reduction="none")).sum()
    if alpha:
        if _linear_head(model):
            effect = lm_head(model)(h_f - h_c)  # W h_f - W h_c without two full logit tensors
        else:
            effect = logits_f - head_logits(model, h_c)
        loss = loss + alpha * (w * F.cross_entropy(effect.float(), targets, reduction="none")).sum()
    return loss, w.sum()


@dataclass
class CFTParams(SFTParams):
    """SFT's parameters (CFT's recipe) plus CFT's own four: alpha, beta, weighting, detach."""

    alpha: float = hp(0.1, ge=0, source=f"{CFT_CODE} train.py:108 loss += 0.1 * loss_diff")
    beta: float = hp(0.25, ge=0, le=1, source=f"{CFT_CODE} train.py:88 beta = 0.25 (weight of the last target token)")
    weighting: str = hp("linear", choices=WEIGHTINGS, source=f"{CFT_CODE} train.py:87-95 linear decay 1 -> beta")
    detach: bool = hp(False, source=f"{CFT_CODE} train.py:75-76 both forward passes carry gradients")

    # the fields CFT adds to SFT: `cft` and `sft` may differ only in these
    OWN_FIELDS: ClassVar[tuple[str, ...]] = ("alpha", "beta", "weighting", "detach")


@register_method("cft")
class CFT(SFT):
    """SFT plus the counterfactual causal-effect loss with token-level weights (CFT's reference recipe)."""

    Params = CFTParams
    REFERENCE: ClassVar[str] = f"{CFT_CODE} (Zhang et al. 2024, arXiv 2410.22809)"

    def _examples(self, data: TrainData, cap: int | None) -> list[CFTExample]:
        n = self.params.history_len
        pairs = self._pairs(data, cap)
        hists = [history_texts(self.texts, data.train[u][:t], n) for u, t in pairs]
        targets = [self.texts[int(data.train[u][t])] for u, t in pairs]
        factual = encode_examples(self.llm, self.template, hists, targets)
        counter = encode_examples(self.llm, self.template, hists, targets, with_history=False)
        return [(f[0], f[1], c[0], c[1]) for f, c in zip(factual, counter)]

    def validation_weights(self):
        """The reference's evaluation loss is the token-weighted normal loss (train.py:100-108)."""
        p = self.params
        return lambda n: token_weights(n, p.beta, p.weighting)

    def train_hooks(self) -> dict[str, Any]:
        p = self.params

        def collate_fn(examples, pad_id, device):
            return pack_batch(examples, pad_id, device, beta=p.beta, weighting=p.weighting, mask_dtype=torch.float32)

        def loss_fn(model, batch):
            return cft_loss(model, batch, alpha=p.alpha, detach=p.detach)

        def example_weight(example) -> float:
            return float(token_weights(len(_label_positions(example[1])), p.beta, p.weighting).sum())

        return {"collate_fn": collate_fn, "loss_fn": loss_fn, "example_weight": example_weight}
