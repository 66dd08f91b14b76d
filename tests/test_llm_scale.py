"""What makes large models fit and long runs resumable, on a tiny model: gradient
checkpointing, k-bit preparation, out-of-memory halving, mid-epoch checkpoints, compile, TF32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.errors import ConfigError
from benchmark.llm.loading import tiny_llm
from benchmark.llm.precision import fp32_head, tf32
from benchmark.llm.training import TrainConfig, collate, prepare_model, train
from tests.test_llm_training import some_examples


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_llm().tokenizer


def losses(tokenizer, config: TrainConfig, n: int = 8, **kwargs):
    llm = tiny_llm(tokenizer, seed=1)
    model = prepare_model(llm.model, config)
    model, result = train(model, some_examples(llm, n), config, pad_id=llm.pad_id, **kwargs)
    return [h["train_loss"] for h in result.history], result, model


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_changes_no_loss(tokenizer, lora):
    base = dict(lora=lora, lr=5e-3, max_steps=3, batch_size=4, eval_every=1, patience=0, warmup=0, lora_dropout=0.0,
                progress=False)
    plain, _, _ = losses(tokenizer, TrainConfig(**base))
    ckpt, _, model = losses(tokenizer, TrainConfig(**base, gradient_checkpointing=True))
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers)  # it was on
    np.testing.assert_allclose(ckpt, plain, rtol=1e-5)


def test_gradient_checkpointing_is_not_part_of_the_resume_fingerprint():
    a = TrainConfig(gradient_checkpointing=False, compile=False, checkpoint_every=0)
    b = TrainConfig(gradient_checkpointing=True, compile=True, checkpoint_every=100)
    assert a.fingerprint(10) == b.fingerprint(10)
    assert a.fingerprint(10) != TrainConfig(lr=1).fingerprint(10)


def test_a_4bit_model_is_prepared_for_kbit_training(tokenizer, monkeypatch):
    """bitsandbytes needs CUDA; the flag transformers sets on a 4-bit model is what routes
    the model through peft's prepare_model_for_kbit_training (norms fp32, input grads)."""
    import peft

    calls = []
    real = peft.prepare_model_for_kbit_training

    def spy(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", spy)
    llm = tiny_llm(tokenizer)
    llm.model.is_loaded_in_4bit = True
    model = prepare_model(llm.model.to(torch.bfloat16), TrainConfig(lora=True, gradient_checkpointing=True))
    assert calls == [{"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}]
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    assert llm.model.model.norm.weight.dtype == torch.float32  # peft keeps norms in fp32
    with pytest.raises(ConfigError, match="lora=true"):
        prepare_model(_flagged(tokenizer), TrainConfig(lora=False))  # full fine-tuning of 4-bit weights


def _flagged(tokenizer):
    model = tiny_llm(tokenizer).model
    model.is_loaded_in_4bit = True
    return model


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_batch(tokenizer):
    """A micro-batch over 2 rows 'runs out of memory': the step is redone with 2-row micro-
    batches (accumulation rises), and the updates are those of the 4-row batches."""
    from benchmark.llm.training import example_loss

    def tight(model, batch):
        if batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return example_loss(model, batch, reduction="sum")

    config = TrainConfig(lora=False, lr=5e-3, max_steps=3, batch_size=4, eval_every=1, patience=0, warmup=0,
                         progress=False)
    want, full, _ = losses(tokenizer, config)
    got, halved, _ = losses(tokenizer, config, loss_fn=tight)
    assert full.micro_batch == 4 and halved.micro_batch == 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_out_of_memory_at_one_example_names_the_fixes(tokenizer):
    def never(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        losses(tokenizer, TrainConfig(lora=False, max_steps=1, batch_size=2, progress=False), loss_fn=never)


def test_a_long_epoch_resumes_mid_epoch(tokenizer, tmp_path):
    """checkpoint_every writes between validations: an interrupted epoch restarts from its
    last checkpoint, not from the epoch's start, and ends with the uninterrupted weights."""
    config = TrainConfig(lora=False, lr=5e-3, epochs=1, batch_size=2, checkpoint_every=2, patience=0, warmup=0,
                         progress=False)

    def run(work, stop_after=None):
        llm = tiny_llm(tokenizer, seed=1)
        examples = some_examples(llm, 12)  # 6 steps in the one epoch
        batches = {"n": 0}

        def counting(chunk, pad_id, device):
            batches["n"] += 1
            if stop_after is not None and batches["n"] > stop_after:
                raise KeyboardInterrupt
            return collate(chunk, pad_id, device)

        model, result = train(prepare_model(llm.model, config), examples, config, pad_id=llm.pad_id, work_dir=work,
                              collate_fn=counting)
        return dict(model.named_parameters()), result, batches["n"]

    want, _, _ = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_after=5)  # dies during step 6, after the step-4 checkpoint
    got, result, n_batches = run(tmp_path / "b")
    assert result.resumed_from == 4 and result.steps == 6 and n_batches == 2
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, atol=1e-6, rtol=1e-6)


def test_compiled_training_matches_eager(tokenizer):
    base = dict(lora=True, lr=5e-3, max_steps=2, batch_size=4, eval_every=1, patience=0, warmup=0, lora_dropout=0.0,
                progress=False)
    eager, _, _ = losses(tokenizer, TrainConfig(**base))
    compiled, _, model = losses(tokenizer, TrainConfig(**base, compile=True))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    body = model.get_base_model().model
    assert body._compiled_call_impl is None  # decoding afterwards runs the eager module


def test_tf32_only_inside_training_steps_on_cuda():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with tf32("cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        with tf32("cpu"):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_fp32_head_stays_fp32_under_bf16_autocast(tokenizer):
    llm = tiny_llm(tokenizer)
    x = torch.randn(3, llm.model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16), fp32_head(llm.model):
        logits = llm.model.get_output_embeddings()(x)
    assert logits.dtype == torch.float32
