"""SFT vs CFT training step time at equal batch (CPU or CUDA).

    python bench/bench_cft.py --device cpu --batch 8 --steps 3 --threads 1
    python bench/bench_cft.py --device cuda --batch 64 --steps 20        # bf16 autocast
    python bench/bench_cft.py --device cuda --batch 64 --steps 20 --full --compile --variants sft,cft

Real SmolLM2-135M-Instruct (bundled GGUF via load_llm), real ML-100K prompts (10 history
titles). Three variants, each forward + backward + AdamW step on LoRA adapters:
  sft     right-padded factual rows, logits only at target positions
  cft     factual rows + packed counterfactual rows in ONE forward (baselines.cft)
  naive   two separate forwards (factual, counterfactual), full-vocabulary logits
Prints step time, tokens/s (real tokens of the factual rows) and two MFUs, both counting the same
useful work for every variant (the factual rows; CFT's counterfactual rows are overhead):
  MFU(6N)   6 x params x tokens/s / peak, the usual convention for full fine-tuning; it overcounts
            here, since frozen weights get no weight gradients and the LM head runs at target positions only
  MFU(LoRA) (4 x body params x tokens + 4 x head params x target tokens) / step time / peak:
            forward 2 + activation-gradient backward 2 per weight; "body" = params minus the
            (tied) token embedding; LoRA's own weight gradients and attention scores are left out
Peak:
989 TFLOP/s bf16 dense on CUDA (H100); on CPU 80 GFLOP/s fp32 per thread (2.5 GHz x 2 AVX2 FMA
units x 8 lanes x 2), or --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.cft import cft_loss, pack_batch
from benchmark.data.split import prepare_split
from benchmark.llm.loading import load_llm
from benchmark.llm.prompts import IGNORE, catalog_texts, encode_examples, get_template
from benchmark.llm.precision import tf32
from benchmark.llm.training import TrainConfig, collate, decoder_body, example_loss, prepare_model

H100_PEAK = 989e12
CPU_PEAK_PER_THREAD = 80e9


def examples(llm, n: int, seed: int = 0):
    """n distinct (user, position) training examples with 10 history items (ML-100K has ~86k;
    sampling distinct users instead would stop at its 943 users)."""
    split = prepare_split("ml-100k")
    texts = catalog_texts(split.catalog, "title_year")
    rng = np.random.default_rng(seed)
    pairs = [(u, t) for u in range(split.n_users) for t in range(10, len(split.train[u]))]
    if n > len(pairs):
        raise SystemExit(f"--batch x (--steps + 1) = {n} examples asked for; ML-100K has {len(pairs)}")
    hists, targets = [], []
    for i in np.sort(rng.choice(len(pairs), size=n, replace=False)):
        u, t = pairs[int(i)]
        seq = split.train[u]
        hists.append([texts[j] for j in seq[t - 10 : t]])
        targets.append(texts[int(seq[t])])
    tmpl = get_template("movie")
    fact = encode_examples(llm, tmpl, hists, targets)
    cf = encode_examples(llm, tmpl, hists, targets, with_history=False)
    return [(f[0], f[1], c[0], c[1]) for f, c in zip(fact, cf)]


def naive_loss(model, batch_f, batch_c):
    lf = model(input_ids=batch_f["input_ids"], attention_mask=batch_f["attention_mask"]).logits[:, :-1]
    lc = model(input_ids=batch_c["input_ids"], attention_mask=batch_c["attention_mask"]).logits[:, :-1]
    mf, mc = batch_f["labels"][:, 1:] != IGNORE, batch_c["labels"][:, 1:] != IGNORE
    tgt = batch_f["labels"][:, 1:][mf]
    zf, zc = lf[mf], lc[mc]
    return F.cross_entropy(zf.float(), tgt) + 0.1 * F.cross_entropy((zf - zc).float(), tgt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default: see the docstring)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning (CFT's recipe) instead of LoRA")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder body (as train(compile=True))")
    ap.add_argument("--variants", default="sft,cft,naive")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = load_llm(None, device=args.device)
    model = prepare_model(llm.model, TrainConfig(lora=not args.full))
    if args.compile:
        decoder_body(model).compile(dynamic=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dev = llm.device
    cuda = dev.type == "cuda"
    exs = examples(llm, args.batch * (args.steps + 1))
    n_params = sum(p.numel() for p in model.parameters())

    def run(variant: str) -> tuple[float, int]:
        times, tokens, targets = [], 0, 0
        for s in range(args.steps + 1):  # first step is warm-up
            chunk = exs[s * args.batch : (s + 1) * args.batch]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with tf32(dev), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                if variant == "sft":
                    batch = collate([(f, l) for f, l, _, _ in chunk], llm.pad_id, dev)
                    loss, n = example_loss(model, batch, reduction="sum")
                    loss = loss / n
                elif variant == "cft":
                    batch = pack_batch(chunk, llm.pad_id, dev, mask_dtype=torch.bfloat16 if cuda else torch.float32)
                    loss, w = cft_loss(model, batch, alpha=0.1)
                    loss = loss / w
                else:
                    bf = collate([(f, l) for f, l, _, _ in chunk], llm.pad_id, dev)
                    bc = collate([(c, l) for _, _, c, l in chunk], llm.pad_id, dev)
                    loss = naive_loss(model, bf, bc)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if s:
                times.append(time.perf_counter() - t0)
                tokens += sum(len(f) for f, _, _, _ in chunk)
                targets += sum(int(np.count_nonzero(np.asarray(lab) != IGNORE)) for _, lab, _, _ in chunk)
        return float(np.mean(times)), tokens, targets

    peak = args.peak_tflops * 1e12 or (H100_PEAK if cuda else CPU_PEAK_PER_THREAD * torch.get_num_threads())
    print(f"MFU peak: {peak / 1e12:.3f} TFLOP/s")
    head = llm.model.get_input_embeddings().weight.numel()
    body = n_params - head
    results = {}
    report = {"device": str(dev), "batch": args.batch, "steps": args.steps, "full": args.full,
              "compile": args.compile, "params": n_params, "peak_tflops": peak / 1e12, "variants": {}}
    for variant in args.variants.split(","):
        step, tokens, targets = run(variant)
        tps = tokens / (step * args.steps)
        mfu_6n = 6 * n_params * tps / peak
        mfu_lora = (4 * body * tokens + 4 * head * targets) / (step * args.steps) / peak
        results[variant] = step
        report["variants"][variant] = {"step_ms": step * 1000, "tokens_per_s": tps, "mfu_6n": mfu_6n,
                                       "mfu_lora": mfu_lora}
        print(f"{variant:6s} step {step * 1000:9.1f} ms  {tps:9.0f} tokens/s  MFU(6N) {mfu_6n:.1%}  "
              f"MFU(LoRA) {mfu_lora:.1%}", flush=True)
    if "sft" in results and "cft" in results:
        report["cft_over_sft"] = results["cft"] / results["sft"]
        print(f"cft/sft {report['cft_over_sft']:.2f}x"
              + (f"   naive/sft {results['naive'] / results['sft']:.2f}x" if "naive" in results else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
