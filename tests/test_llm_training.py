"""Training loop: label masking, logits only at labels, LoRA placement, checkpoint resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.llm.loading import tiny_llm
from benchmark.llm.prompts import DEFAULT_TEMPLATE, IGNORE, encode_example, encode_examples, response_ids
from benchmark.llm.training import (
    TrainConfig,
    cap_examples,
    collate,
    label_hidden,
    label_logits,
    prepare_model,
    sequence_examples,
    train,
)

TITLES = ["Toy Story (1995)", "Heat (1995)", "GoldenEye (1995)", "Casino (1995)", "Babe (1995)", "Se7en (1995)"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_llm().tokenizer


def fresh(tokenizer, seed=0):
    return tiny_llm(tokenizer, seed=seed)


def some_examples(llm, n=12):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        hist = [TITLES[i] for i in rng.choice(len(TITLES), size=3, replace=False)]
        out.append(encode_example(llm, DEFAULT_TEMPLATE, hist, TITLES[int(rng.integers(len(TITLES)))]))
    return out


def test_labels_only_on_target_tokens_and_eos(tokenizer):
    llm = fresh(tokenizer)
    ids, labels = encode_example(llm, DEFAULT_TEMPLATE, TITLES[:3], "Casino (1995)")
    target = response_ids(llm, "Casino (1995)") + [llm.eos_id]
    labelled = [lab for lab in labels if lab != IGNORE]
    assert labelled == target
    assert ids[-len(target):] == target
    assert all(lab == IGNORE for lab in labels[: len(ids) - len(target)])
    # the batched encoder gives the same ids and labels
    batched_ids, batched_labels = encode_examples(llm, DEFAULT_TEMPLATE, [TITLES[:3]], ["Casino (1995)"])[0]
    assert batched_ids.tolist() == ids and batched_labels.tolist() == labels


def test_counterfactual_prompt_drops_history_only(tokenizer):
    llm = fresh(tokenizer)
    with_h, lab_h = encode_example(llm, DEFAULT_TEMPLATE, TITLES[:3], "Heat (1995)")
    without, lab_n = encode_example(llm, DEFAULT_TEMPLATE, TITLES[:3], "Heat (1995)", with_history=False)
    assert len(without) < len(with_h)
    assert [x for x in lab_h if x != IGNORE] == [x for x in lab_n if x != IGNORE]
    assert "Toy Story" in llm.tokenizer.decode(with_h) and "Toy Story" not in llm.tokenizer.decode(without)


def test_label_logits_match_full_logits(tokenizer):
    llm = fresh(tokenizer)
    batch = collate(some_examples(llm, 4), llm.pad_id)
    with torch.no_grad():
        logits, targets, rows = label_logits(llm.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        full = llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != IGNORE
    expected = full[:, :-1][mask]
    assert logits.shape == expected.shape and logits.shape[0] == int(mask.sum())
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(targets, batch["labels"][:, 1:][mask])
    assert torch.equal(rows, mask.nonzero()[:, 0])
    hidden, _, _ = label_hidden(llm.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert hidden.shape == (logits.shape[0], llm.model.config.hidden_size)


def test_collate_right_pads(tokenizer):
    llm = fresh(tokenizer)
    exs = [([5, 6, 7], [IGNORE, 6, 7]), ([8], [IGNORE])]
    b = collate(exs, pad_id=llm.pad_id)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, llm.pad_id, llm.pad_id]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]


def test_lora_only_on_listed_projections(tokenizer):
    llm = fresh(tokenizer)
    config = TrainConfig(lora=True, lora_targets=("q_proj", "v_proj"), progress=False)
    model = prepare_model(llm.model, config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    projections = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert projections == {"q_proj", "v_proj"}
    assert len(trainable) == 2 * 2 * llm.model.config.num_hidden_layers  # A and B per target per layer


def test_training_lowers_loss_and_uses_only_labelled_positions(tokenizer):
    llm = fresh(tokenizer)
    examples = some_examples(llm, 8)
    config = TrainConfig(lora=False, lr=3e-3, epochs=6, batch_size=4, warmup=0, progress=False, patience=0)
    model = prepare_model(llm.model, config)
    from benchmark.llm.training import loss_validator

    val = loss_validator(examples, llm.pad_id)
    before = val(model)
    model, result = train(model, examples, config, pad_id=llm.pad_id, validate=val)
    assert result.steps == 12
    assert result.best_score > before + 0.5  # minus loss went up: the model learned the targets


def test_token_losses_attribute_each_token_to_its_example_and_match_the_validator(tokenizer):
    from benchmark.llm.training import example_loss, loss_validator, token_losses

    llm = fresh(tokenizer)
    examples = some_examples(llm, 5)
    sums, counts = torch.zeros(5), torch.zeros(5)
    start = 0
    for losses, rows, n_rows in token_losses(llm.model, examples, llm.pad_id, batch_size=2):
        sums[start : start + n_rows] += torch.bincount(rows, weights=losses, minlength=n_rows)
        counts[start : start + n_rows] += torch.bincount(rows, minlength=n_rows)
        start += n_rows
    assert start == 5
    for i, example in enumerate(examples):  # each example alone, padded to nothing
        with torch.no_grad():
            alone, n = example_loss(llm.model, collate([example], llm.pad_id), reduction="sum")
        assert int(counts[i]) == n and float(sums[i]) == pytest.approx(float(alone), rel=1e-4)
    assert -loss_validator(examples, llm.pad_id, batch_size=3)(llm.model) == pytest.approx(
        float(sums.sum() / counts.sum()), rel=1e-5)


def test_resume_after_interruption_gives_identical_model(tokenizer, tmp_path):
    config = TrainConfig(lora=True, lr=1e-2, epochs=2, batch_size=2, eval_every=1, patience=0, lora_dropout=0.0,
                         progress=False)

    def run(work_dir, interrupt_at=None):
        llm = fresh(tokenizer)
        examples = some_examples(llm, 6)
        calls = {"n": 0}

        def validate(model):
            calls["n"] += 1
            if interrupt_at is not None and calls["n"] == interrupt_at:
                raise KeyboardInterrupt
            return -float(calls["n"])  # first validation stays the best

        model = prepare_model(llm.model, config)
        model, result = train(model, examples, config, pad_id=llm.pad_id, work_dir=work_dir, validate=validate)
        batch = collate(examples[:2], llm.pad_id)
        with torch.no_grad():
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        return logits, result

    reference, ref_result = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupt_at=4)
    resumed, result = run(tmp_path / "b")
    assert result.resumed_from == 3
    assert result.steps == ref_result.steps == 6
    torch.testing.assert_close(resumed, reference, atol=1e-6, rtol=1e-6)
    # a finished run is not repeated: the rerun loads the checkpoint and returns the same weights
    again, again_result = run(tmp_path / "b")
    assert again_result.resumed_from == 6
    assert again_result.loaded_only and not result.loaded_only and not ref_result.loaded_only
    torch.testing.assert_close(again, reference, atol=1e-6, rtol=1e-6)
    # training time accumulates across the attempts that built the checkpoint; loading adds none
    assert result.total_seconds > result.seconds > 0
    assert again_result.total_seconds == pytest.approx(result.total_seconds, abs=0.05)
    # the part spent before this attempt: the interrupted attempt's, then (only loaded) all of it
    assert ref_result.prior_seconds == 0.0
    assert 0 < result.prior_seconds < result.total_seconds
    assert result.prior_seconds + result.seconds == pytest.approx(result.total_seconds, abs=0.5)
    assert again_result.prior_seconds == pytest.approx(again_result.total_seconds, abs=1e-6)
    # tokens trained on add up across attempts too, and a load reports them (the learning curve's x)
    assert ref_result.total_tokens == ref_result.tokens > 0
    assert result.total_tokens == again_result.total_tokens == ref_result.total_tokens > result.tokens > 0
    # one attempt: the checkpoint's time (taken at its last save) is the attempt's, less what followed that save
    assert 0 < ref_result.total_seconds <= ref_result.seconds


def test_best_weights_are_restored(tokenizer):
    llm = fresh(tokenizer)
    examples = some_examples(llm, 4)
    config = TrainConfig(lora=False, lr=1e-2, epochs=3, batch_size=4, eval_every=1, patience=0, warmup=0,
                         progress=False)
    model = prepare_model(llm.model, config)
    snapshots = []

    def validate(m):
        snapshots.append({k: v.detach().clone() for k, v in m.named_parameters()})
        return [0.0, 1.0, -1.0][len(snapshots) - 1]  # the second evaluation is best

    model, result = train(model, examples, config, pad_id=llm.pad_id, validate=validate)
    assert result.best_step == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, snapshots[1][name])


def test_sequence_examples_and_cap():
    seqs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    pairs = sequence_examples(seqs)
    assert pairs == [(0, 1), (0, 2), (2, 1)]
    capped = cap_examples(list(range(100)), 10, seed=3)
    assert len(capped) == 10 and capped == sorted(capped) and capped == cap_examples(list(range(100)), 10, seed=3)
    assert cap_examples([1, 2], None, seed=0) == [1, 2]


def test_gradient_accumulation_matches_one_big_batch(tokenizer):
    def run(batch_size, grad_accum):
        llm = fresh(tokenizer)
        config = TrainConfig(lora=False, lr=1e-3, max_steps=1, batch_size=batch_size, grad_accum=grad_accum,
                             warmup=0, progress=False)
        model, _ = train(prepare_model(llm.model, config), some_examples(llm, 4), config, pad_id=llm.pad_id)
        return dict(model.named_parameters())

    big, accumulated = run(4, 1), run(2, 2)
    for name, p in big.items():
        torch.testing.assert_close(accumulated[name], p, atol=1e-5, rtol=1e-4)


def test_full_finetuning_keeps_fp32_master_weights(tokenizer):
    llm = fresh(tokenizer)
    model = prepare_model(llm.model.to(torch.bfloat16), TrainConfig(lora=False, progress=False))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())


def test_training_dir_is_shared_across_inference_settings_only(tmp_path):
    from types import SimpleNamespace

    from baselines.cft import CFTParams
    from baselines.sft import SFTParams
    from benchmark.llm.training import training_dir

    ctx = SimpleNamespace(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work", seed=0)
    inference = ("grounding", "num_beams", "eval_batch_size", "num_threads", "max_new_tokens")
    base = training_dir(ctx, "sft", SFTParams(), inference, "extra")
    assert base.parent == tmp_path / "cache" / "models"
    assert training_dir(ctx, "sft", SFTParams(grounding="l2", num_beams="4"), inference, "extra") == base
    assert training_dir(ctx, "sft", SFTParams(lr=1e-3), inference, "extra") != base
    assert training_dir(ctx, "sft", SFTParams(), inference, "other data") != base
    assert training_dir(SimpleNamespace(**{**vars(ctx), "seed": 1}), "sft", SFTParams(), inference, "extra") != base
    assert training_dir(ctx, "cft", CFTParams(), inference, "extra") != base  # another objective
    no_cache = SimpleNamespace(cache_dir=None, work_dir=tmp_path / "work", seed=0)
    assert training_dir(no_cache, "sft", SFTParams(), inference, "extra") == tmp_path / "work"


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_checkpoint_files_follow_the_umask(tokenizer, tmp_path, mask):
    """safetensors writes 0600 whatever the umask; a shared cache must be readable like the run store."""
    import os

    config = TrainConfig(lora=True, lr=1e-2, epochs=1, batch_size=2, lora_dropout=0.0, progress=False)
    llm = fresh(tokenizer)
    old = os.umask(mask)
    try:
        train(prepare_model(llm.model, config), some_examples(llm, 4), config, pad_id=llm.pad_id, work_dir=tmp_path / "w")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "w").rglob("*") if p.is_file()]
    assert any(p.name == "trainable.safetensors" for p in files)
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
