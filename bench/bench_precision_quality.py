"""bf16 against fp32 quality: the validation loss of SFT trained in each precision, paired per user.

    python bench/bench_precision_quality.py --threads 1 > bench/precision-quality-2026-12-02.json

Loads two SFT models of the same cpu budget (2,048 examples) from the run store's checkpoints
(nothing is trained): one trained under bf16 autocast (the leaderboard's `sft`), one in fp32
(`sft32`, `--set sft32.precision=fp32`). For the method's own 256 validation users, each
model's per-user validation loss (the mean token cross-entropy of the answer, as the run's
`valid_loss`) is computed under both evaluation precisions, so the training precision's effect
is separated from the evaluation's (the weights are those the model ranks with, bf16 after a
bf16 run, held in fp32; the run's own `valid_loss` was taken on the fp32 master weights, so
the bf16 row's "eval bf16" value is close to it, not equal). The difference of the pooled token
means (the run's definition, so `stats.bootstrap_ci`'s mean of per-user values does not apply)
gets a paired bootstrap interval over users (10,000 resamples, seed 0). The test NDCG@10 difference of the
two runs comes from `python -m benchmark compare`. JSON to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precision import cpu_name  # noqa: E402
from bench_search_error import POINTS, load_point  # noqa: E402

from baselines.sft import history_texts  # noqa: E402
from benchmark.data.split import prepare_split  # noqa: E402
from benchmark.llm.prompts import encode_examples  # noqa: E402
from benchmark.llm.training import token_losses  # noqa: E402

POINTS.setdefault("sft_n2048fp32", {"max_train_examples": 2048, "precision": "fp32"})


def per_user_losses(model, examples, pad_id: int, precision: str, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Summed answer-token loss and answer-token count of each example."""
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    model.eval()
    start = 0
    for losses, rows, n_rows in token_losses(model, examples, pad_id, batch_size=batch_size, precision=precision):
        sums[start : start + n_rows] += torch.bincount(rows, weights=losses, minlength=n_rows).numpy()
        counts[start : start + n_rows] += torch.bincount(rows, minlength=n_rows).numpy()
        start += n_rows
    return sums, counts


def paired_bootstrap(a: tuple, b: tuple, n: int = 10_000, seed: int = 0) -> list[float]:
    """95% interval of pooled-mean(a) - pooled-mean(b), users resampled together."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a[0]), size=(n, len(a[0])))
    diff = a[0][idx].sum(1) / a[1][idx].sum(1) - b[0][idx].sum(1) / b[1][idx].sum(1)
    return [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-dir", default="runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = prepare_split("ml-100k")
    data = split.train_data()
    out = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "losses": {}}
    results = {}
    for point in ("sft_n2048", "sft_n2048fp32"):
        t0 = time.perf_counter()
        model = load_point(point, split, Path(args.runs_dir))
        p = model.params
        rows = model._valid_rows(data, p.valid_users)
        hists = [history_texts(model.texts, data.valid.histories[r], p.history_len) for r in rows]
        targets = [model.texts[int(data.valid.targets[r])] for r in rows]
        examples = encode_examples(model.llm, model.template, hists, targets, train_on_inputs=p.train_on_inputs)
        trained = model.ctx.notes["sft"]
        out["losses"][point] = {"trained_in": p.precision, "run_valid_loss": trained.get("valid_loss"),
                                "users": len(rows)}
        # the weights the model ranks with (bf16 storage after a bf16 run), held in fp32 so that "fp32"
        # evaluates in fp32 and "bf16" under autocast, as the run's validation does
        out["losses"][point]["weights_stored_as"] = str(next(model.llm.model.parameters()).dtype)
        net = model.llm.model.float()
        for precision in ("fp32", "bf16"):
            sums, counts = per_user_losses(net, examples, model.llm.pad_id, precision)
            results[(point, precision)] = (sums, counts)
            out["losses"][point][f"valid_loss_eval_{precision}"] = float(sums.sum() / counts.sum())
        out["losses"][point]["seconds"] = time.perf_counter() - t0
        del model
        gc.collect()
    out["differences"] = {}
    for precision in ("fp32", "bf16"):
        a, b = results[("sft_n2048fp32", precision)], results[("sft_n2048", precision)]
        out["differences"][f"fp32_trained_minus_bf16_trained_eval_{precision}"] = {
            "delta": float(a[0].sum() / a[1].sum() - b[0].sum() / b[1].sum()),
            "ci95_paired_bootstrap": paired_bootstrap(a, b),
            "users_lower_for_fp32_trained": int(np.sum(a[0] / a[1] < b[0] / b[1])),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
