"""SASRec+ : SASRec with the recipe of Klenitskiy & Vasilev (RecSys 2023), as a preset of `sasrec`.

"Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?" trains SASRec with
full-softmax cross-entropy and reports NDCG@10 0.1821 / HR@10 0.3152 on ML-1M (leave-one-out,
full ranking, seen items removed). Their code (antklen/sasrec-bert4rec-recsys23: `src/models.py`,
`src/configs/SASRec.yaml`, `src/run_final.sh`) builds on pmixer/SASRec.pytorch; this preset sets
every `sasrec` option to their values:

- the pmixer block (`block="pmixer"`), hidden 64, 2 blocks, 1 head, max_len 200;
- N(0, 0.02) for every weight, zero biases (`init_std=0.02`);
- Adam with torch's defaults (`adam_beta2=0.999`), lr 1e-3, batch 128, dropout 0.1;
- position ids counted from each window's first item, as with their right padding (`positions="start"`);
- plain shuffled batches (`batching="shuffle"`);
- at most 100 epochs, early stopping on validation NDCG@10 with patience 10.

Any field can still be overridden with `--set sasrec_kv.<field>=...`. Fitted models share
`sasrec`'s cache: a `sasrec` run with the same values loads the same model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from baselines.sasrec import SASRec, SASRecParams
from benchmark.hparams import field_meta
from benchmark.registry import register_method

SOURCE = "antklen/sasrec-bert4rec-recsys23 (src/configs/SASRec.yaml, src/run_final.sh)"


def _preset(name: str, default: Any) -> Any:
    """SASRecParams' declaration of `name` (its bounds, choices and role) with the recipe's default."""
    base = next(f for f in dataclasses.fields(SASRecParams) if f.name == name)
    return dataclasses.field(default=default, metadata={"hp": {**field_meta(base), "source": SOURCE}})


@dataclass
class SASRecKVParams(SASRecParams):
    """SASRecParams with Klenitskiy & Vasilev's values as defaults (see the module docstring)."""

    dropout: float = _preset("dropout", 0.1)
    lr: float = _preset("lr", 1e-3)
    batch_size: int = _preset("batch_size", 128)
    epochs: int = _preset("epochs", 100)
    block: str = _preset("block", "pmixer")
    adam_beta2: float = _preset("adam_beta2", 0.999)
    init_std: float = _preset("init_std", 0.02)
    positions: str = _preset("positions", "start")
    batching: str = _preset("batching", "shuffle")


@register_method("sasrec_kv")
class SASRecKV(SASRec):
    """SASRec trained with Klenitskiy & Vasilev's SASRec+ recipe; ranks the whole catalog."""

    Params = SASRecKVParams
