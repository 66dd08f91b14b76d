"""CALRec's two-tower training batches and per-example loss terms.

A row is the factual sequence prompt + target + eos (SFT's labels) and, for the item tower,
the target's text alone. The terms are the next-item generation loss (NIG, mean token
cross-entropy of the target) and two InfoNCE losses over in-batch negatives: the item tower
against the target span's mean state given the user (TT) and against the user span's mean
state (UT). Duplicate item texts in a batch are not negatives of each other.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.llm.contrastive import info_nce, span_mean, text_groups
from benchmark.llm.pooling import batch_ids, last_hidden, pooled_hidden
from benchmark.llm.prompts import IGNORE
from benchmark.llm.training import head_logits, label_positions

# (input_ids, labels, user_start, prompt_len, item_ids): the factual sequence prompt + target
# + eos with SFT's labels; v_U pools [user_start, prompt_len), v_T|U pools
# [prompt_len, prompt_len + len(item_ids)); the item tower reads item_ids alone.
CALRecExample = tuple[np.ndarray, np.ndarray, int, int, np.ndarray]


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
