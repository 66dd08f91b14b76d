"""Bench: LLM fine-tuning throughput and an SFT run-time estimate on CPU.

    python bench/bench_llm_train.py --threads 1 --steps 3
    python bench/bench_llm_train.py --threads 2 --steps 3 --rank-users 16

What it measures, with the bundled SmolLM2-135M-Instruct (converted safetensors cache) on
real ML-100K training examples built exactly as SFT builds them (last 10 items as quoted
"Title (Year)", chat template):

1. Training tokens/s for LoRA (r=8 on q/k/v/o) and full fine-tuning, `--steps` timed
   optimizer steps at batch 8 after one warm-up step. Model FLOPs utilisation is reported
   as 6 * params * tokens / time against `--peak-gflops` (an assumed CPU peak; the
   default 2 cores x 2.5 GHz x 32 fp32 FLOP/cycle with AVX2 FMA = 160 GFLOP/s).
2. SFT fit time at the defaults, extrapolated from the measured step time: 1,024 examples
   (BIGRec's cap, the CPU default) x epochs at batch 8, plus the validation-loss passes.
3. SFT ranking time: trie-constrained beam search (k=20) on `--rank-users` test users, per
   user, extrapolated to every ML-100K test user (943).

Results go to stdout as JSON; bench/RESULTS.md keeps a copy with the command.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.llm.loading import load_llm  # noqa: E402
from benchmark.llm.prompts import DEFAULT_TEMPLATE, catalog_texts, encode_examples, prompt_ids_batch, response_ids_batch  # noqa: E402
from benchmark.llm.training import (  # noqa: E402
    TrainConfig,
    cap_examples,
    collate,
    example_loss,
    loss_validator,
    make_optimizer,
    prepare_model,
    sequence_examples,
)


def build_examples(split, n: int, seed: int = 0):
    texts = catalog_texts(split.catalog, "title_year")
    pairs = cap_examples(sequence_examples(split.train, history_len=10), n, seed)
    hists = [[texts[int(i)] for i in split.train[u][max(0, t - 10) : t]] for u, t in pairs]
    targets = [texts[int(split.train[u][t])] for u, t in pairs]
    return texts, hists, targets


def time_steps(llm, examples, lora: bool, steps: int, batch: int) -> dict:
    config = TrainConfig(lora=lora, progress=False)
    model = prepare_model(llm.model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, config, llm.device)
    model.train()
    tokens, elapsed = 0, 0.0
    losses = []
    for step in range(steps + 1):
        chunk = examples[(step * batch) % len(examples) :][:batch]
        b = collate(chunk, llm.pad_id, llm.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = example_loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if step > 0:  # step 0 is warm-up
            tokens += int(b["attention_mask"].sum())
            elapsed += dt
    if lora:
        model = model.unload()  # drop adapters; base weights untouched
    llm.model = model
    model.eval()
    return {
        "mode": "lora" if lora else "full",
        "trainable_params": sum(p.numel() for p in params),
        "steps": steps,
        "batch": batch,
        "tokens_per_step": tokens / steps,
        "seconds_per_step": elapsed / steps,
        "tokens_per_s": tokens / elapsed,
        "losses": [round(x, 3) for x in losses],
    }


def time_sft(split, args) -> dict:
    """The real SFT method end to end (fit, then trie ranking of a few test users)."""
    import tempfile

    from baselines.sft import SFT, SFTParams
    from benchmark.registry import RunContext
    from benchmark.types import CandidateSet, RankRequest

    params = SFTParams(max_train_examples=str(args.sft_only), num_beams=str(args.num_beams), early_stopping="none")
    with tempfile.TemporaryDirectory() as work:
        ctx = RunContext(seed=0, device="cpu", work_dir=Path(work), validate=lambda r: {}, progress=False)
        method = SFT(params, ctx)
        t0 = time.perf_counter()
        method.fit(split.train_data())
        fit_s = time.perf_counter() - t0
        users = split.test.users[: args.rank_users]
        request = RankRequest(users, split.test.histories[: args.rank_users], CandidateSet("full", users), 20)
        t0 = time.perf_counter()
        ranked = method.rank(request)
        rank_s = time.perf_counter() - t0
    targets = split.test.targets[: args.rank_users]
    hits = [(row == t).any() for row, t in zip(ranked.items[:, :10], targets)]
    return {
        "sft_fit_examples": args.sft_only,
        "fit_s": round(fit_s, 1),
        "fit_notes": ctx.notes.get("sft"),
        "rank_users": int(args.rank_users),
        "rank_s_per_user": round(rank_s / args.rank_users, 2),
        "hr@10_on_these_users": float(np.mean(hits)),
        "info": ranked.info,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank-users", type=int, default=8)
    ap.add_argument("--num-beams", type=int, default=10)
    ap.add_argument("--peak-gflops", type=float, default=160.0)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--sft-only", type=int, default=0, metavar="N",
                    help="only time the real SFT method: fit on N examples, rank --rank-users test users")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from benchmark.data.split import prepare_split

    if args.sft_only:
        print(json.dumps(time_sft(prepare_split("ml-100k"), args), indent=1))
        return
    t0 = time.perf_counter()
    split = prepare_split("ml-100k")
    t_split = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = load_llm(None, device="cpu")
    t_load = time.perf_counter() - t0
    n_params = llm.n_params

    t0 = time.perf_counter()
    texts, hists, targets = build_examples(split, 1024)
    examples = encode_examples(llm, DEFAULT_TEMPLATE, hists, targets)
    t_encode = time.perf_counter() - t0
    lengths = np.array([len(e[0]) for e in examples])

    out: dict = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads={args.threads}",
        "torch": torch.__version__,
        "params": n_params,
        "split_s": round(t_split, 2),
        "load_s": round(t_load, 2),
        "encode_1024_s": round(t_encode, 2),
        "example_tokens_mean": float(lengths.mean()),
        "example_tokens_max": int(lengths.max()),
        "train": [],
    }
    for lora in ([True] if args.skip_full else [True, False]):
        res = time_steps(llm, examples, lora, args.steps, args.batch)
        res["achieved_gflops_6N"] = 6 * n_params * res["tokens_per_s"] / 1e9
        res["mfu_vs_assumed_peak"] = res["achieved_gflops_6N"] / args.peak_gflops
        out["train"].append(res)
        print(json.dumps(res), flush=True)
        if not lora:  # full fine-tuning changed the weights: reload for the ranking timing
            llm = load_llm(None, device="cpu")

    # validation loss on 64 users (the CPU default for early stopping)
    rows = np.arange(64)
    vh = [[texts[int(i)] for i in split.valid.histories[r][-10:]] for r in rows]
    vt = [texts[int(split.valid.targets[r])] for r in rows]
    val = loss_validator(encode_examples(llm, DEFAULT_TEMPLATE, vh, vt), llm.pad_id, batch_size=8)
    t0 = time.perf_counter()
    val(llm.model)
    out["valid_loss_64_users_s"] = round(time.perf_counter() - t0, 2)

    # ranking: trie-constrained beam search
    from benchmark.llm.decoding import ItemTrie, constrained_beam_search

    t0 = time.perf_counter()
    trie = ItemTrie.build(response_ids_batch(llm, texts), llm.eos_id)
    out["trie_build_s"] = round(time.perf_counter() - t0, 2)
    users = np.arange(args.rank_users)
    prompts = prompt_ids_batch(llm, DEFAULT_TEMPLATE, [[texts[int(i)] for i in split.test.histories[u][-10:]] for u in users])
    exclude = [np.asarray(split.test.histories[u]) for u in users]
    t0 = time.perf_counter()
    res = constrained_beam_search(llm.model, prompts, trie, num_beams=args.num_beams, k=20, exclude=exclude,
                                  pad_id=llm.pad_id, batch_size=8, progress=False)
    t_rank = time.perf_counter() - t0
    out["rank"] = {
        "users": int(args.rank_users),
        "num_beams": args.num_beams,
        "k": 20,
        "seconds_per_user": t_rank / args.rank_users,
        "items_returned_mean": float(np.mean([len(r) for r in res])),
    }

    # extrapolation to `python -m benchmark run --methods sft` on ML-100K at the CPU defaults
    lora = out["train"][0]
    steps_per_epoch = math.ceil(1024 / args.batch)
    n_test = len(split.test)
    out["estimate_default_cpu"] = {
        "fit_s_per_epoch_1024_examples": steps_per_epoch * lora["seconds_per_step"] + out["valid_loss_64_users_s"],
        "rank_s_all_test_users": n_test * out["rank"]["seconds_per_user"],
        "test_users": n_test,
        "fixed_s": t_load + t_encode + out["trie_build_s"],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
