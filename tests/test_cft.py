"""CFT: loss against a naive two-pass reference, weights, counterfactual prompts, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.cft import CFT, CFTParams, cft_loss, pack_batch, token_weights
from benchmark.llm.loading import tiny_llm
from benchmark.llm.prompts import IGNORE, encode_examples, get_template
from benchmark.types import PAD
from benchmark.llm.training import example_loss, collate

TITLES = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Casino (1995)", "Se7en (1995)", "Babe (1995)"]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(seed=0)


def make_examples(llm, n=4, long=False):
    template = get_template("movie")
    rng = np.random.default_rng(0)
    hists, targets = [], []
    for i in range(n):
        h = rng.choice(len(TITLES) - 1, size=10 if long else 1 + i % 4, replace=long)
        hists.append([TITLES[j] for j in h])
        targets.append(TITLES[(i + 2) % len(TITLES)])
    fact = encode_examples(llm, template, hists, targets)
    cf = encode_examples(llm, template, hists, targets, with_history=False)
    return [(f[0], f[1], c[0], c[1]) for f, c in zip(fact, cf)], hists, targets


def naive_loss(model, examples, alpha, beta, weighting):
    """Two separate full forward passes per example, full-vocabulary logits, explicit loop."""
    num, den = 0.0, 0.0
    for f_ids, f_lab, c_ids, c_lab in examples:
        lf = model(input_ids=torch.as_tensor(f_ids[None], dtype=torch.long)).logits[0]
        lc = model(input_ids=torch.as_tensor(c_ids[None], dtype=torch.long)).logits[0]
        fpos = [p - 1 for p in range(len(f_lab)) if f_lab[p] != IGNORE]
        cpos = [p - 1 for p in range(len(c_lab)) if c_lab[p] != IGNORE]
        tgt = torch.as_tensor([int(f_lab[p + 1]) for p in fpos])
        n = len(fpos)
        if weighting == "none" or n == 1:
            w = torch.ones(n)
        else:
            w = torch.tensor([1 - t * (1 - beta) / (n - 1) for t in range(n)])
        zf, zc = lf[fpos], lc[cpos]
        num = num + (w * F.cross_entropy(zf, tgt, reduction="none")).sum()
        num = num + alpha * (w * F.cross_entropy(zf - zc, tgt, reduction="none")).sum()
        den += float(w.sum())
    return num / den


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_weights_fall_linearly_from_one_to_beta():
    w = token_weights(5, 0.25)
    assert w[0] == 1.0 and w[-1] == pytest.approx(0.25)
    assert np.allclose(np.diff(w), -0.1875)
    assert token_weights(1, 0.25).tolist() == [1.0]
    assert token_weights(4, 0.25, "none").tolist() == [1.0] * 4


def test_counterfactual_prompt_drops_every_history_title(llm):
    examples, hists, targets = make_examples(llm)
    for (f_ids, f_lab, c_ids, c_lab), hist, target in zip(examples, hists, targets):
        cf_prompt = llm.tokenizer.decode(c_ids[c_lab == IGNORE])
        fact_prompt = llm.tokenizer.decode(f_ids[f_lab == IGNORE])
        assert all(title in fact_prompt for title in hist)
        assert not any(title in cf_prompt for title in hist)
        assert "recommend" in cf_prompt  # the instruction stays
        assert llm.tokenizer.decode(c_ids[c_lab != IGNORE][:-1]) == target  # and so does the target
        assert len(c_ids) < len(f_ids)


def test_weights_cover_exactly_the_target_tokens(llm):
    examples, _, targets = make_examples(llm)
    batch = pack_batch(examples, llm.pad_id, beta=0.25)
    sizes = [int((lab != IGNORE).sum()) for _, lab, _, _ in examples]
    assert batch["weights"].numel() == sum(sizes) == batch["targets"].numel()
    start = 0
    for (f_ids, f_lab, _, _), n in zip(examples, sizes):
        w = batch["weights"][start : start + n]
        assert w[0] == 1.0 and w[-1] == pytest.approx(0.25)
        assert torch.equal(batch["targets"][start : start + n], torch.as_tensor(f_lab[f_lab != IGNORE], dtype=torch.long))
        start += n


def test_counterfactual_rows_are_packed(llm):
    examples, _, _ = make_examples(llm, n=6, long=True)  # 10 history titles, as the default prompt
    batch = pack_batch(examples, llm.pad_id)
    rows = batch["input_ids"].shape[0]
    assert rows < 2 * len(examples)  # several counterfactual sequences share a row
    # every packed segment restarts its positions at 0
    assert int((batch["position_ids"][len(examples) :] == 0).sum()) >= len(examples)


def test_alpha_zero_without_weighting_equals_sft_loss(llm):
    examples, _, _ = make_examples(llm)
    model = llm.model
    with torch.no_grad():
        loss, total = cft_loss(model, pack_batch(examples, llm.pad_id, weighting="none"), alpha=0.0)
        sft, n = example_loss(model, collate([(f, lab) for f, lab, _, _ in examples], llm.pad_id), reduction="sum")
    assert float(total) == n
    assert float(loss / total) == pytest.approx(float(sft / n), abs=1e-5)


@pytest.mark.parametrize("alpha,beta,weighting", [(0.1, 0.25, "linear"), (1.0, 0.5, "linear"), (0.3, 0.25, "none")])
def test_packed_single_forward_matches_naive_two_pass_loss_and_gradients(llm, alpha, beta, weighting):
    """Tolerance: 1e-5 on the loss and 1e-4 (relative 1e-3) on gradients, in fp32."""
    examples, _, _ = make_examples(llm, n=5)
    model = llm.model
    model.zero_grad(set_to_none=True)
    ref = naive_loss(model, examples, alpha, beta, weighting)
    ref.backward()
    g_ref = grads(model).clone()
    model.zero_grad(set_to_none=True)
    loss, total = cft_loss(model, pack_batch(examples, llm.pad_id, beta=beta, weighting=weighting), alpha=alpha)
    (loss / total).backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    assert float(loss / total) == pytest.approx(float(ref), abs=1e-5)
    assert torch.allclose(g, g_ref, atol=1e-4, rtol=1e-3)


def test_detach_stops_gradients_through_the_counterfactual_branch(llm):
    examples, _, _ = make_examples(llm, n=3)
    model = llm.model
    batch = pack_batch(examples, llm.pad_id)
    a, _ = cft_loss(model, batch, alpha=0.1, detach=True)
    b, _ = cft_loss(model, batch, alpha=0.1, detach=False)
    assert float(a) == pytest.approx(float(b), abs=1e-6)  # same value, different graph
    model.zero_grad(set_to_none=True)
    a.backward()
    ga = grads(model).clone()
    model.zero_grad(set_to_none=True)
    b.backward()
    gb = grads(model)
    model.zero_grad(set_to_none=True)
    assert not torch.allclose(ga, gb)


def test_params_validate():
    from benchmark.config import resolve_params
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match="weighting"):
        resolve_params("cft", CFTParams, {"cft": {"weighting": "exp"}})
    with pytest.raises(ConfigError, match="beta"):
        resolve_params("cft", CFTParams, {"cft": {"beta": 2.0}})
    assert CFT.Params is CFTParams and CFT.uses_llm


def test_cft_fit_rank_end_to_end_trains_with_the_counterfactual_loss(tmp_path, monkeypatch):
    """Through the shared training loop: the CFT loss is what trains, inference is SFT's."""
    import baselines.cft as cft_mod
    from test_sft import check_rows, request_for, tiny_data

    from benchmark.config import resolve_params
    from benchmark.registry import RunContext, get_method

    llm = tiny_llm(hidden=32, layers=2)
    model_dir = tmp_path / "tiny"
    llm.model.save_pretrained(model_dir)
    llm.tokenizer.save_pretrained(model_dir)
    calls = []
    real = cft_mod.cft_loss

    def spy(model, batch, **kw):
        calls.append(kw)
        return real(model, batch, **kw)

    monkeypatch.setattr(cft_mod, "cft_loss", spy)
    cls = get_method("cft")
    params = resolve_params("cft", cls.Params, {"cft": {
        "llm": str(model_dir), "max_train_examples": 8, "epochs": 1, "batch_size": 4, "grad_accum": 1,
        "warmup_steps": 0, "max_new_tokens": 8, "eval_batch_size": 4, "valid_users": 3, "alpha": 0.5,
        "precision": "fp32"}})
    assert (params.grounding, params.l2_merge, params.embed_model, params.num_beams) == ("l2", "round_robin",
                                                                                        "tuned", 5)
    ctx = RunContext(seed=0, device="cpu", work_dir=tmp_path / "work", validate=lambda r: {"ndcg@10": 0.0},
                     progress=False)
    method = cls(params, ctx)
    data = tiny_data()
    method.fit(data)
    assert len(calls) == 2 and calls[0] == {"alpha": 0.5, "detach": False}  # 8 examples / batch 4
    # the reference's grounding: 5 beams, each ranking the whole catalog by L2, merged round-robin;
    # every user has 4 unseen items, so K=4 distinct unseen items come back for everyone
    request = request_for(data, k=4)
    ranked = method.rank(request)
    check_rows(ranked, request, data.n_items)
    assert (ranked.items != PAD).all() and ranked.info["filled_positions"] == 0
    assert ranked.info["grounding"] == "l2" and "round_robin over 5 beams" in ranked.info["leaderboard_note"]
