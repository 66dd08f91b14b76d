"""Speed of LlamaRec's stage 2: verbalizer scoring of 20 candidates per user.

    python bench/bench_llamarec.py --device cpu --threads 2 --users 64 --batches 1,8,16
    python bench/bench_llamarec.py --device cuda --users 1024 --batches 16,64,128

Model: the bundled SmolLM2-135M-Instruct (weights as loaded; training does not change the
cost). Data: ML-100K (5-core, leave-one-out); for each of the first N test users the prompt
lists the last H history titles (H=20 as the reference, H=10 as the CPU default) and 20
candidates (the user's unseen items in a seeded random order), built by
baselines.llamarec.LlamaRec.encode_prompts exactly as a run builds them.
Prints users/s for (a) naive: one user per forward, the model's full output logits, and
(b) benchmark.llm.verbalizer.verbalizer_scores (left-padded, length-sorted batches, LM head
on the last position only), and checks the two agree.
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

from baselines.llamarec import LlamaRec, LlamaRecParams  # noqa: E402
from benchmark.data.split import prepare_split  # noqa: E402
from benchmark.llm.loading import load_llm  # noqa: E402
from benchmark.llm.verbalizer import index_labels, label_token_ids, verbalizer_scores  # noqa: E402
from benchmark.registry import RunContext  # noqa: E402


def build(device: str, history: int):
    split = prepare_split("ml-100k")
    method = LlamaRec(LlamaRecParams(history_len=history), RunContext(0, device, Path("/tmp"), lambda r: {}))
    method.llm = load_llm(device=device)
    method.texts = method._truncated_texts(split.train_data())
    return split, method


def prompts_for(split, method: LlamaRec, n_users: int, k: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(0)
    hists, cands = [], []
    if n_users > len(split.test):
        print(f"--users {n_users}: ML-100K has {len(split.test)} test users; using them all", file=sys.stderr)
        n_users = len(split.test)
    for row in range(n_users):
        hist = split.test.histories[row]
        unseen = np.setdiff1d(np.arange(split.n_items), hist)
        hists.append(hist)
        cands.append(rng.choice(unseen, size=k, replace=False))
    return method.encode_prompts(hists, cands)


@torch.inference_mode()
def naive(model, prompts, letters, device) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = []
    for p in prompts:
        logits = model(input_ids=torch.tensor([p], device=device)).logits[0, -1].float()
        out.append(logits[letters].cpu().numpy())
    return np.asarray(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--naive-users", type=int, default=16)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--histories", default="10,20")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for history in [int(h) for h in args.histories.split(",")]:
        split, method = build(args.device, history)
        llm = method.llm
        letters = label_token_ids(llm, index_labels(20))
        prompts = prompts_for(split, method, args.users)
        mean_len = float(np.mean([len(p) for p in prompts]))
        ref, naive_s = naive(llm.model, prompts[: args.naive_users], letters, llm.device)
        row = {"history": history, "prompt_tokens_mean": round(mean_len, 1),
               "naive_users_per_s": round(args.naive_users / naive_s, 2)}
        for b in [int(x) for x in args.batches.split(",")]:
            verbalizer_scores(llm.model, prompts[:b], letters, pad_id=llm.pad_id, batch_size=b)  # warm-up
            t0 = time.perf_counter()
            scores = verbalizer_scores(llm.model, prompts, letters, pad_id=llm.pad_id, batch_size=b)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            row[f"batch{b}_users_per_s"] = round(len(prompts) / (time.perf_counter() - t0), 2)
            diff = float(np.abs(scores[: args.naive_users] - ref).max())
            agree = float(np.mean(scores[: args.naive_users].argmax(1) == ref.argmax(1)))
            row[f"batch{b}_max_abs_diff"] = round(diff, 4)
            row[f"batch{b}_top1_agreement"] = agree
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"device": str(llm.device), "dtype": str(llm.dtype), "threads": args.threads,
                      "users": len(prompts), "results": results}))


if __name__ == "__main__":
    main()
