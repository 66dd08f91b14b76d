"""bf16 where the hardware has it, but every score that ranks stays fp32 (no bf16 ties)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.llm.loading import tiny_llm
from benchmark.llm.precision import autocast, fp32_head, inference_precision, model_precision
from benchmark.llm.verbalizer import verbalizer_scores


def _bf16_llm(scale: float = 150.0):
    llm = tiny_llm(hidden=32, layers=2, seed=5)
    with torch.no_grad():  # logits of real magnitude (20-30), where bf16's step is 0.125
        llm.model.get_output_embeddings().weight.mul_(scale)
    llm.model.to(torch.bfloat16)
    return llm


def test_the_head_computes_fp32_logits_under_bf16_autocast():
    llm = _bf16_llm()
    ids = torch.tensor([[5, 17, 230, 44]])
    with autocast("cpu", "bf16"):
        plain = llm.model(input_ids=ids).logits
        with fp32_head(llm.model):
            exact = llm.model(input_ids=ids).logits
    assert plain.dtype == torch.bfloat16 and exact.dtype == torch.float32
    hidden = llm.model.model(input_ids=ids).last_hidden_state
    want = F.linear(hidden.float(), llm.model.get_output_embeddings().weight.float())
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-3)
    assert model_precision(llm.model) == "bf16"


def test_the_heads_fp32_copy_is_made_once_and_follows_weight_changes():
    llm = _bf16_llm()
    head = llm.model.get_output_embeddings()
    x = torch.randn(2, llm.model.config.hidden_size).bfloat16()
    casts = []
    real_float = torch.Tensor.float

    def counting_float(t, *a, **k):
        if t.data_ptr() == head.weight.data_ptr():  # the weight or a detached view of it
            casts.append(1)
        return real_float(t, *a, **k)

    with torch.no_grad(), fp32_head(llm.model):
        torch.Tensor.float = counting_float
        try:
            first = head(x)
            assert torch.equal(head(x), first) and len(casts) == 1  # one copy for many steps
            head.weight.mul_(2)  # an in-place change (an optimizer step) invalidates the copy
            torch.testing.assert_close(head(x), 2 * first, rtol=1e-2, atol=1e-2)
            assert len(casts) == 2
        finally:
            torch.Tensor.float = real_float
    with fp32_head(llm.model):  # with gradients the weight is never a stale detached copy
        head(x).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_verbalizer_scores_have_no_ties_where_fp32_has_none():
    llm = _bf16_llm()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 2000, size=int(n)).tolist() for n in rng.integers(8, 20, size=24)]
    letters = rng.choice(np.arange(3000, 4000), size=20, replace=False).tolist()
    with torch.no_grad():  # 20 letters whose logits differ by a few hundredths, as a reranker's do
        head = llm.model.get_output_embeddings().weight
        base = head[letters[0]].float().clone()
        noise = torch.from_numpy(rng.normal(size=(20, head.shape[1]))).float()
        head[letters] = (base + 0.003 * base.abs().mean() * noise).to(head.dtype)
    exact = verbalizer_scores(llm.model, prompts, letters, pad_id=llm.pad_id, precision="bf16")
    fp32_model = tiny_llm(hidden=32, layers=2, seed=5)
    fp32_model.model.load_state_dict({k: v.float() for k, v in llm.model.state_dict().items()})
    reference = verbalizer_scores(fp32_model.model, prompts, letters, pad_id=llm.pad_id, precision="fp32")
    assert exact.dtype == np.float64
    assert np.abs(exact).mean() > 5 and np.ptp(exact, axis=1).max() < 5  # close logits of real magnitude
    for row_b, row_f in zip(exact, reference):
        if len(np.unique(row_f)) == len(row_f):
            assert len(np.unique(row_b)) == len(row_b)
    # bf16 logits themselves would tie: the fp32 head is what keeps the order
    with autocast("cpu", "bf16"):
        coarse = llm.model(input_ids=torch.tensor([prompts[0]])).logits[0, -1, letters]
    assert len(torch.unique(coarse)) < len(letters)


def test_inference_precision_follows_the_weights():
    llm = tiny_llm(hidden=32, layers=2)
    with inference_precision(llm.model):
        assert not torch.is_autocast_cpu_enabled() or torch.get_autocast_cpu_dtype() != torch.bfloat16
    llm.model.to(torch.bfloat16)
    with inference_precision(llm.model):
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_the_precision_that_ran_is_recorded_in_the_unit(native, tmp_path, monkeypatch):
    """config.json holds the resolved precision (and, without native bf16, the hardware departure),
    metrics.json the precision the method ran in, and the run manifest the machine."""
    import json

    from benchmark import recipes
    from benchmark.cli import main

    monkeypatch.setattr(recipes, "native_bf16", lambda device: native)
    model_dir = tmp_path / "tiny"
    llm = tiny_llm(hidden=32, layers=2)
    llm.model.save_pretrained(model_dir)
    llm.tokenizer.save_pretrained(model_dir)
    runs = tmp_path / "runs"
    sets = ["max_train_examples=8", "epochs=1", "batch_size=4", "grad_accum=1", "valid_users=4", "grounding=trie",
            "num_beams=2", "max_new_tokens=8"]
    argv = ["--runs-dir", str(runs), "run", "--methods", "sft", "--dataset", "synthetic", "--eval-users", "6",
            "--llm", str(model_dir), "--run-id", "p", "--quiet"] + [a for s in sets for a in ("--set", f"sft.{s}")]
    assert main(argv) == 0
    unit = runs / "p" / "sft" / "seed-0"
    config = json.loads((unit / "config.json").read_text())
    metrics = json.loads((unit / "metrics.json").read_text())
    expected = "bf16" if native else "fp32"
    assert config["params"]["precision"] == expected
    assert metrics["info"]["precision"] == expected and metrics["info"]["sft"]["precision"] == expected
    hardware = [d for d in config["recipe"]["departures"] if d["field"] == "precision"]
    assert bool(hardware) is (not native)
    assert json.loads((runs / "p" / "run.json").read_text())["manifest"]["device"] == "cpu"
