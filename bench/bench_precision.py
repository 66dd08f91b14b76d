"""Bench: bf16 against fp32 for the LLM methods on this machine, measured in one run.

    python bench/bench_precision.py --steps 3 --users 24 --threads 2 > bench/precision.json

With the bundled SmolLM2-135M-Instruct and real ML-100K data, through the methods' own
code paths (SFT and CFT under their CPU budget, CFT's reference recipe otherwise):

1. training tokens/s of `--steps` optimizer steps (micro-batch 16, no accumulation), SFT
   and CFT, full fine-tuning (the recipe) and LoRA r=8 on q/v, fp32 against bf16;
2. ranking users/s on `--users` ML-100K test users: the reference grounding (5 free beams,
   per-beam L2, round-robin) and the trie-constrained search with 20 beams, fp32 against bf16,
   with the tokens each decoded and the time in one-token decoding steps (free generation may
   stop at other lengths in bf16, so decoded tokens/s is the like-for-like ratio there);
3. whether bf16 ranking keeps fp32's order where fp32 has no ties (trie scores).

Every figure of one machine comes from this one process, so ratios compare like with like.
The CPU model and its bf16 flags are printed with the figures (`lscpu`, /proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.data.split import prepare_split  # noqa: E402
from benchmark.llm.training import prepare_model, train  # noqa: E402
from benchmark.recipes import cpu_has_bf16, resolve_recipe  # noqa: E402
from benchmark.registry import RunContext, get_method  # noqa: E402
from benchmark.types import CandidateSet, RankRequest  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def make(name: str, tmp: Path, **sets):
    cls = get_method(name)
    layer = {name: {"budget": "cpu", **sets}}
    params = resolve_recipe(cls, name, layer, device_type="cpu").params
    ctx = RunContext(seed=0, device="cpu", work_dir=tmp, validate=lambda r: {"ndcg@10": 0.0}, progress=False)
    return cls(params, ctx)


def train_rate(name: str, split, precision: str, lora: bool, steps: int, tmp: Path) -> dict:
    from benchmark.llm.prompts import catalog_texts, get_template

    method = make(name, tmp, precision=precision, lora=lora, grad_accum=1, batch_size=16, warmup_steps=0)
    p = method.params
    method.template = get_template(p.prompt)
    method.llm = method._load()
    method.texts = catalog_texts(split.catalog, p.item_text)
    examples = method._examples(split.train_data(), 16 * (steps + 1))
    config = dataclasses.replace(method.train_config(), max_steps=1, checkpoint=False, progress=False)
    model = prepare_model(method.llm.model, config)
    train(model, examples[:16], config, pad_id=method.llm.pad_id, **method.train_hooks())  # warm-up step
    config = dataclasses.replace(config, max_steps=steps)
    _, result = train(model, examples[16:], config, pad_id=method.llm.pad_id, **method.train_hooks())
    return {"seconds_per_step": result.seconds / steps, "tokens_per_s": result.tokens / result.seconds,
            "tokens": result.tokens}


def rank_rate(split, precision: str, grounding: str, users: int, tmp: Path) -> dict:
    beams = 20 if grounding == "trie" else 5
    method = make("sft", tmp, precision=precision, grounding=grounding, num_beams=beams, max_train_examples=16,
                  batch_size=16, grad_accum=1, epochs=1, early_stopping="none")
    method.fit(split.train_data())  # one step: the weights hardly move; ranking cost is what is timed
    rows = np.arange(users)
    test = split.test
    request = RankRequest(test.users[rows], [test.histories[r] for r in rows],
                          CandidateSet("full", test.users[rows]), k=20)
    method.rank(RankRequest(request.users[:2], request.histories[:2], CandidateSet("full", request.users[:2]), 20))
    # Free generation stops at each beam's end of sequence, so the two precisions need not decode
    # the same number of tokens. The model's calls are timed by kind: one-token decoding
    # steps (rows x 1) and the rest (prompts, embedded titles); decoded tokens/s is the
    # like-for-like speed where the token counts differ.
    tally = {"decode_tokens": 0, "decode_s": 0.0, "other_positions": 0, "other_s": 0.0}
    started: list[tuple[float, int, int]] = []

    def before(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = tuple((ids if ids is not None else kwargs["inputs_embeds"][..., 0]).shape)
        started.append((time.perf_counter(), shape[0], shape[-1]))

    def after(_module, _args, _kwargs, _out):
        t, rows, length = started.pop()
        kind = "decode" if length == 1 else "other"
        tally[f"{kind}_s"] += time.perf_counter() - t
        tally["decode_tokens" if length == 1 else "other_positions"] += rows * length

    model = method.llm.model  # the decoders call the whole model (body and fp32 head) per step
    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    t0 = time.perf_counter()
    try:
        ranked = method.rank(request)
    finally:
        for h in hooks:
            h.remove()
    seconds = time.perf_counter() - t0
    return {"users_per_s": users / seconds, "seconds_per_user": seconds / users, **tally,
            "decode_tokens_per_s": tally["decode_tokens"] / max(tally["decode_s"], 1e-9),
            "items": ranked.items, "scores": ranked.scores}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = prepare_split("ml-100k")
    tmp = Path("/tmp/bench_precision")
    out: dict = {"cpu": cpu_name(), "native_bf16": cpu_has_bf16(), "threads": args.threads,
                 "torch": torch.__version__, "train": {}, "rank": {}}
    if not args.skip_train:
        for name in ("sft", "cft"):
            for lora in (False, True):
                for precision in ("fp32", "bf16"):
                    key = f"{name} {'lora' if lora else 'full'} {precision}"
                    out["train"][key] = train_rate(name, split, precision, lora, args.steps, tmp / key.replace(" ", "_"))
                    print(key, out["train"][key], file=sys.stderr)
                fp, bf = (out["train"][f"{name} {'lora' if lora else 'full'} {p}"]["tokens_per_s"] for p in ("fp32", "bf16"))
                out["train"][f"{name} {'lora' if lora else 'full'} bf16/fp32"] = bf / fp
        out["train"]["cft/sft step time (full, bf16)"] = (out["train"]["cft full bf16"]["seconds_per_step"]
                                                          / out["train"]["sft full bf16"]["seconds_per_step"])
    for grounding in ("l2", "trie"):
        res = {p: rank_rate(split, p, grounding, args.users, tmp / f"rank_{grounding}_{p}") for p in ("fp32", "bf16")}
        entry = {p: {k: v for k, v in r.items() if k not in ("items", "scores")} for p, r in res.items()}
        entry["bf16/fp32"] = res["bf16"]["users_per_s"] / res["fp32"]["users_per_s"]
        entry["bf16/fp32 decoded tokens/s"] = res["bf16"]["decode_tokens_per_s"] / res["fp32"]["decode_tokens_per_s"]
        if grounding == "trie":
            fp, bf = res["fp32"], res["bf16"]
            no_tie = [r for r in range(args.users) if len(np.unique(fp["scores"][r])) == fp["scores"].shape[1]]
            entry["rows_without_fp32_ties"] = len(no_tie)
            entry["bf16_rows_with_ties_there"] = sum(len(np.unique(bf["scores"][r])) < bf["scores"].shape[1]
                                                     for r in no_tie)
        out["rank"][grounding] = entry
        print(grounding, entry, file=sys.stderr)
    print(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
