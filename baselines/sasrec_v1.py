"""`sasrec_v1`: the harness's SASRec defaults before recipe version 2, kept under their own name.

Until recipe version 2, `sasrec` meant these values, which converge in fewer epochs on a CPU
than Klenitskiy & Vasilev's recipe (now `sasrec`'s default): a textbook pre-LN block with
GELU, xavier-normal embeddings, Adam beta2 0.98, lr 2e-3, batch 64, dropout 0.2, up to 200
epochs, positions counted back from the last item, and length-bucketed batches. On ML-1M
they reached NDCG@10 0.1669 against 0.1792 for the K&V recipe (leaderboards/README.md).
Published rows labelled `sasrec` before recipe version 2 are this preset.
Recipe version 2 of this preset fixes the padding target (see `baselines/sasrec.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from baselines.sasrec import SASRec, SASRecParams
from benchmark.hparams import hp
from benchmark.registry import register_method

V1 = "llmrec-bench sasrec defaults before recipe v2 (commit 2e3cf3e)"


@dataclass
class SASRecV1Params(SASRecParams):
    """The earlier harness defaults; fields not listed keep SASRec's declarations."""

    dropout: float = hp(0.2, ge=0, lt=1, source=f"{V1}: the literature's value for dense data (Kang & McAuley 2018)")
    lr: float = hp(2e-3, gt=0, source=f"{V1}: converges in fewer epochs than 1e-3 with batch 64 (bench/RESULTS.md)")
    batch_size: int = hp(64, ge=1, source=V1)
    epochs: int = hp(200, ge=1, source=V1)
    adam_beta2: float = hp(0.98, ge=0, lt=1, source=V1)
    init_std: float = hp(0.0, ge=0, source=f"{V1}: xavier-normal embeddings, torch's default Linear init")
    block: str = hp("preln", choices=("preln", "pmixer"), source=f"{V1}: a textbook pre-LN block with GELU")
    positions: str = hp("end", choices=("end", "start"), source=f"{V1}: the last item is always position max_len-1")
    batching: str = hp("bucket", choices=("bucket", "shuffle"), source=f"{V1}: length-bucketed batches")


@register_method("sasrec_v1")
class SASRecV1(SASRec):
    """SASRec with the harness's pre-v2 defaults (pre-LN, lr 2e-3, batch 64, bucketed batches)."""

    Params = SASRecV1Params
    REFERENCE: ClassVar[str] = V1
