"""Search error or model error? Beam search against exact ranking, for an untuned and a tuned model.

    python bench/bench_search_error.py --users 12 --points sft_n0,sft_n2048 --beams 10,20,50

For a seeded sample of ML-100K test users, and for each model (a learning-curve point of the
run store, loaded from its cached checkpoint: nothing is trained here), every catalog item is
ranked by the full likelihood of its answer (`grounding=likelihood`, the exact ranking), and
compared with the trie-constrained beam search at several widths and with the reference's
L2 grounding of 5 free beams:

- where the beam's top-1 ranks under the exact likelihood (1 = the search found the most likely item);
- the overlap of the beam's top-10 with the exact top-10;
- the target's rank under the exact likelihood (model error: how likely the model finds the truth);
- NDCG@10 of each ranking on these users.

Also how the model's top items track training popularity (Spearman correlation of an item's
exact log-likelihood, averaged over users, with its training count). JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.sft import exclusions  # noqa: E402
from benchmark.data.split import prepare_split  # noqa: E402
from benchmark.llm.likelihood import item_log_likelihoods, rank_by_likelihood, rank_of  # noqa: E402
from benchmark.llm.precision import inference_precision  # noqa: E402
from benchmark.recipes import resolve_recipe  # noqa: E402
from benchmark.registry import RunContext, get_method  # noqa: E402
from benchmark.runner import CUTOFFS  # noqa: E402
from benchmark.scoring.metrics import per_user_metrics  # noqa: E402
from benchmark.types import PAD, CandidateSet, RankRequest  # noqa: E402

# the settings of bench/learning_curve.sh's points (on top of the cpu budget)
POINTS = {
    "sft_n0": {"max_train_examples": 0},
    "sft_n256": {"max_train_examples": 256},
    "sft_n1024": {"max_train_examples": 1024},
    "sft_n2048": {"max_train_examples": 2048},
    "sft_n4096": {"max_train_examples": 4096},
    "sft_last3": {"train_positions": "last", "epochs": 3},
}


def load_point(label: str, split, runs: Path):
    method, sets = label.split("_")[0], POINTS[label]
    cls = get_method(method)
    params = resolve_recipe(cls, label, {label: {"budget": "cpu", **sets}}, device_type="cpu").params
    ctx = RunContext(seed=0, device="cpu", work_dir=runs / ".work" / f"bench-{label}", validate=lambda r: {},
                     progress=False, cache_dir=runs / ".cache")
    model = cls(params, ctx)
    model.name = method
    model.fit(split.train_data())
    if model.ctx.notes["sft"].get("steps") and not model.ctx.notes["sft"].get("loaded_from"):
        print(f"warning: {label} was trained here, not loaded from the run store's cache", file=sys.stderr)
    return model


def ndcg10(items: np.ndarray, targets: np.ndarray) -> float:
    return float(per_user_metrics(items, targets, CUTOFFS)["ndcg@10"].mean())


def beam_lists(model, request: RankRequest, beams: int) -> np.ndarray:
    from benchmark.llm.decoding import constrained_beam_search

    if model.trie is None:
        model._build_trie()
    res = constrained_beam_search(model.llm.model, model._prompts(request), model.trie, num_beams=beams, k=20,
                                  exclude=exclusions(request, len(model.texts)), pad_id=model.llm.pad_id,
                                  batch_size=4, progress=False)
    out = np.full((len(res), 20), PAD, dtype=np.int64)
    for row, pairs in enumerate(res):
        for col, (item, _) in enumerate(pairs[:20]):
            out[row, col] = item
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--points", default="sft_n0,sft_n2048")
    ap.add_argument("--beams", default="10,20,50")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = prepare_split("ml-100k")
    rows = np.sort(np.random.default_rng(0).choice(len(split.test), size=args.users, replace=False))
    test = split.test
    request = RankRequest(test.users[rows], [test.histories[r] for r in rows], CandidateSet("full", test.users[rows]),
                          k=20)
    targets = test.targets[rows]
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items)
    out: dict = {"users": args.users, "points": {}}
    for label in [p.strip() for p in args.points.split(",") if p.strip()]:
        model = load_point(label, split, Path(args.runs_dir))
        exclude = exclusions(request, len(model.texts))
        answers, prompts = model.answers(), model._prompts(request)
        t0 = time.perf_counter()
        exact_scores = []
        with inference_precision(model.llm.model):
            for r in range(len(rows)):
                exact_scores.append(item_log_likelihoods(model.llm.model, prompts[r], answers, eos_id=model.llm.eos_id,
                                                         pad_id=model.llm.pad_id))
        exact_s = (time.perf_counter() - t0) / len(rows)
        exact = np.stack([rank_by_likelihood(s, exclude[r], 20)[0] for r, s in enumerate(exact_scores)])
        entry = {
            "exact_seconds_per_user": exact_s,
            "exact_ndcg@10": ndcg10(exact, targets),
            "target_rank_median": float(np.median([rank_of(s, int(t), exclude[r])
                                                   for r, (s, t) in enumerate(zip(exact_scores, targets))])),
            "catalog_items": int(len(answers)),
        }
        mean_ll = np.mean(np.stack(exact_scores), axis=0)
        from scipy.stats import spearmanr

        entry["spearman_loglik_vs_train_popularity"] = float(spearmanr(mean_ll, counts).statistic)
        with inference_precision(model.llm.model):
            for beams in [int(b) for b in args.beams.split(",")]:
                t0 = time.perf_counter()
                lists = beam_lists(model, request, beams)
                top1_rank = [rank_of(exact_scores[r], int(lists[r, 0]), exclude[r]) for r in range(len(rows))]
                overlap = [len(set(lists[r, :10].tolist()) & set(exact[r, :10].tolist())) / 10 for r in range(len(rows))]
                entry[f"trie{beams}"] = {
                    "seconds_per_user": (time.perf_counter() - t0) / len(rows),
                    "ndcg@10": ndcg10(lists, targets),
                    "top1_exact_rank_median": float(np.median(top1_rank)),
                    "top1_is_exact_top1": float(np.mean(np.array(top1_rank) == 1)),
                    "overlap@10_with_exact": float(np.mean(overlap)),
                }
            model.params.grounding = "l2"
            ranked = model._rank(request)
            entry["l2_5beams"] = {"ndcg@10": ndcg10(ranked.items, targets),
                                  "validity": float(np.mean(ranked.extras["valid"]))}
        out["points"][label] = entry
        print(label, json.dumps(entry), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
