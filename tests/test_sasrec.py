"""SASRec on a tiny synthetic catalog with a planted next-item rule (item i -> item i+1 mod 30)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines.sasrec as sasrec
from benchmark.errors import ConfigError
from benchmark.ranking import rank_by_scores
from benchmark.registry import RunContext
from benchmark.types import PAD, CandidateSet, Catalog, EvalSet, RankedLists, RankRequest, TrainData

N_ITEMS = 30
N_USERS = 60


def _planted_split(seed: int = 0) -> tuple[TrainData, EvalSet]:
    """Each user walks i, i+1, i+2, ... (mod 30) from a random start for 8-16 steps; leave-one-out."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(N_USERS):
        start = int(rng.integers(N_ITEMS))
        length = int(rng.integers(8, 17))
        seqs.append((start + np.arange(length)) % N_ITEMS)
    users = np.arange(N_USERS, dtype=np.int64)
    train = [s[:-2].astype(np.int64) for s in seqs]
    valid = EvalSet(users, np.array([s[-2] for s in seqs], dtype=np.int64), train)
    test_hist = [s[:-1].astype(np.int64) for s in seqs]
    test = EvalSet(users, np.array([s[-1] for s in seqs], dtype=np.int64), test_hist)
    names = [f"item{i}" for i in range(N_ITEMS)]
    catalog = Catalog(raw_ids=names, titles=names, years=[None] * N_ITEMS, genres=[""] * N_ITEMS)
    data = TrainData("planted", "loo", "test", N_USERS, N_ITEMS, catalog, train, valid)
    return data, test


def _ndcg_hr_at_10(ranked: RankedLists, targets: np.ndarray) -> tuple[float, float]:
    top = ranked.items[:, :10]
    hit = top == targets[:, None]
    found = hit.any(axis=1)
    rank = hit.argmax(axis=1)
    ndcg = np.where(found, 1.0 / np.log2(rank + 2.0), 0.0)
    return float(ndcg.mean()), float(found.mean())


def _ctx(data: TrainData, seed: int = 0, calls: list | None = None) -> RunContext:
    def validate(ranked: RankedLists) -> dict[str, float]:
        assert np.array_equal(ranked.users, data.valid.users)
        ndcg, hr = _ndcg_hr_at_10(ranked, data.valid.targets)
        if calls is not None:
            calls.append(ndcg)
        return {"ndcg@10": ndcg, "hr@10": hr}

    return RunContext(seed=seed, device="cpu", work_dir=Path("."), validate=validate, progress=False)


def _params(**kw) -> sasrec.SASRecParams:
    base = dict(
        hidden=16, blocks=1, heads=1, dropout=0.1, max_len=20, lr=1e-2, batch_size=16, epochs=12, patience=4
    )
    base.update(kw)
    return sasrec.SASRecParams(**base)


def _full(ev: EvalSet, k: int = 10) -> RankRequest:
    return RankRequest(ev.users, ev.histories, CandidateSet("full", ev.users, None, True), k)


@pytest.fixture(scope="module")
def planted():
    return _planted_split()


@pytest.fixture(scope="module")
def trained(planted):
    data, _ = planted
    method = sasrec.SASRec(_params(), _ctx(data))
    method.fit(data)
    return method


def _popularity(data: TrainData, ev: EvalSet) -> RankedLists:
    counts = torch.from_numpy(np.bincount(np.concatenate(data.train), minlength=N_ITEMS).astype(np.float32))
    return rank_by_scores(_full(ev), N_ITEMS, lambda users, hist: counts.expand(len(users), -1))


def test_registered_under_its_name():
    assert sasrec.SASRec.name == "sasrec"
    assert dataclasses.is_dataclass(sasrec.SASRec.Params)
    defaults = sasrec.SASRecParams()
    assert (defaults.hidden, defaults.blocks, defaults.loss, defaults.max_len) == (64, 2, "ce", 200)


def test_learns_planted_rule_far_better_than_popularity(planted, trained):
    data, test = planted
    ndcg, hr = _ndcg_hr_at_10(trained.rank(_full(test)), test.targets)
    _, pop_hr = _ndcg_hr_at_10(_popularity(data, test), test.targets)
    assert hr >= 0.9, hr
    assert ndcg >= 0.6, ndcg
    assert hr > pop_hr + 0.3, (hr, pop_hr)
    notes = trained.ctx.notes["sasrec"]
    assert 1 <= notes["best_epoch"] <= notes["epochs_run"] <= 12
    assert notes["best_valid_ndcg@10"] == max(r["valid_ndcg@10"] for r in trained.history)


def test_bce_loss_also_learns(planted):
    data, test = planted
    method = sasrec.SASRec(_params(loss="bce", epochs=30), _ctx(data))
    method.fit(data)
    _, hr = _ndcg_hr_at_10(method.rank(_full(test)), test.targets)
    _, pop_hr = _ndcg_hr_at_10(_popularity(data, test), test.targets)
    assert hr > pop_hr + 0.2, (hr, pop_hr)


def test_pmixer_block_also_learns(planted):
    data, test = planted
    method = sasrec.SASRec(_params(block="pmixer", init_std=0.02, adam_beta2=0.999), _ctx(data))
    method.fit(data)
    assert all(isinstance(b, sasrec._PmixerBlock) for b in method.model.blocks)
    assert method.model.blocks[0].q.bias.abs().sum() > 0  # trained from zero biases
    _, hr = _ndcg_hr_at_10(method.rank(_full(test)), test.targets)
    _, pop_hr = _ndcg_hr_at_10(_popularity(data, test), test.targets)
    assert hr > pop_hr + 0.3, (hr, pop_hr)


def test_pmixer_block_matches_torch_multihead_attention_reference():
    """The block equals pmixer's formula written with nn.MultiheadAttention (independent code)."""
    torch.manual_seed(0)
    hidden, heads, length = 8, 2, 5
    block = sasrec._PmixerBlock(hidden, heads, dropout=0.0).eval()
    for param in block.parameters():  # non-trivial LayerNorm affine parameters too
        torch.nn.init.normal_(param, std=0.3)
    mha = torch.nn.MultiheadAttention(hidden, heads, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.q.weight, block.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([block.q.bias, block.kv.bias]))
        mha.out_proj.weight.copy_(block.proj.weight)
        mha.out_proj.bias.copy_(block.proj.bias)
    x = torch.randn(3, length, hidden)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    with torch.no_grad():
        got = block(x, causal.expand(3, 1, length, length))
        q = block.norm1(x)
        h = block.norm2(q + mha(q, x, x, attn_mask=~causal, need_weights=False)[0])
        want = h + block.ff2(torch.relu(block.ff1(h)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_positions_from_start_make_outputs_prefix_invariant_and_padding_free():
    """positions="start": a prefix's states do not change when items follow it, nor with left padding."""
    torch.manual_seed(0)
    seq = torch.tensor([[3, 7, 1, 9, 4, 2]])
    start = sasrec.SASRecModel(10, _params(hidden=8, max_len=8, positions="start")).eval()
    end = sasrec.SASRecModel(10, _params(hidden=8, max_len=8, positions="end")).eval()
    end.load_state_dict(start.state_dict())  # same weights; only the position ids differ
    with torch.no_grad():
        full, prefix = start(seq), start(seq[:, :4])
        torch.testing.assert_close(full[:, :4], prefix)
        padded = start(torch.tensor([[0, 0, 3, 7, 1, 9]]))
        torch.testing.assert_close(padded[:, 2:], full[:, :4])
        # with positions counted from the end, appending items moves the prefix's position ids
        assert not torch.allclose(end(seq)[:, :4], end(seq[:, :4]))


def test_shuffled_batching_covers_every_user_once_in_random_order():
    rng = np.random.default_rng(0)
    batches = sasrec._shuffled_batches(10, 4, rng)
    assert [len(b) for b in batches] == [4, 4, 2]
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(10)) and flat.tolist() != list(range(10))


def test_klenitskiy_vasilev_options_also_learn(planted):
    data, test = planted
    params = _params(block="pmixer", positions="start", batching="shuffle", init_std=0.02, adam_beta2=0.999)
    method = sasrec.SASRec(params, _ctx(data))
    method.fit(data)
    _, hr = _ndcg_hr_at_10(method.rank(_full(test)), test.targets)
    _, pop_hr = _ndcg_hr_at_10(_popularity(data, test), test.targets)
    assert hr > pop_hr + 0.3, (hr, pop_hr)


def test_init_std_draws_every_weight_from_a_normal_and_zeroes_biases():
    torch.manual_seed(0)
    model = sasrec.SASRecModel(500, _params(hidden=32, init_std=0.02)).requires_grad_(False)
    assert torch.all(model.item_emb.weight[0] == 0)  # padding row
    assert abs(float(model.item_emb.weight[1:].std()) - 0.02) < 0.002
    assert abs(float(model.blocks[0].ff1.weight.std()) - 0.02) < 0.004
    assert all(float(b.ff1.bias.abs().sum()) == 0 for b in model.blocks)
    default = sasrec.SASRecModel(500, _params(hidden=32, init_std=0.0)).requires_grad_(False)
    assert float(default.blocks[0].ff1.bias.abs().sum()) > 0  # torch's default Linear init


def test_sasrec_defaults_are_the_klenitskiy_vasilev_recipe_and_v1_keeps_the_old_ones(tmp_path, planted):
    from baselines.sasrec_v1 import SASRecV1, SASRecV1Params
    from benchmark.hparams import sources
    from benchmark.registry import get_method

    recipe = dict(hidden=64, blocks=2, heads=1, dropout=0.1, max_len=200, lr=1e-3, batch_size=128, epochs=100,
                  patience=10, block="pmixer", adam_beta2=0.999, init_std=0.02, positions="start",
                  batching="shuffle", amp=False)
    defaults = sasrec.SASRecParams()
    assert {k: getattr(defaults, k) for k in recipe} == recipe
    assert all(field in sources(sasrec.SASRecParams) for field in recipe)  # every value has its source
    old = dict(dropout=0.2, lr=2e-3, batch_size=64, epochs=200, block="preln", adam_beta2=0.98, init_std=0.0,
               positions="end", batching="bucket")
    assert get_method("sasrec_v1") is SASRecV1
    assert {k: getattr(SASRecV1Params(), k) for k in old} == old
    data, _ = planted
    ctx = dataclasses.replace(_ctx(data), cache_dir=tmp_path)
    assert sasrec.SASRec(defaults, ctx)._cache_path(data) != SASRecV1(SASRecV1Params(), ctx)._cache_path(data)
    same = sasrec.SASRec(sasrec.SASRecParams(**old), ctx)._cache_path(data)
    assert SASRecV1(SASRecV1Params(), ctx)._cache_path(data) == same  # the same model: one cache entry


def test_no_target_is_predicted_from_a_padding_position(planted, monkeypatch):
    """Rows shorter than their batch: the first item sits after padding and is never a target
    (the reference trains on inputs seq[:-1] against labels seq[1:])."""
    data, _ = planted
    method = sasrec.SASRec(_params(), _ctx(data))
    method.n_items = data.n_items
    model = method.build_model(data.n_items)
    batch = [np.array([3, 4, 5, 6, 7]), np.array([1, 2]), np.array([9, 10, 11])]
    padded = torch.from_numpy(sasrec._left_pad(batch, 21))
    inputs, targets = padded[:, :-1], padded[:, 1:]
    assert (inputs[1:, 0] == 0).all() and (targets[1:, 2:3] > 0).all()  # short rows start with padding
    seen = {}
    real_ce = torch.nn.functional.cross_entropy

    def spy(logits, target, *args, **kwargs):
        seen["targets"] = target.clone()
        return real_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(sasrec.F, "cross_entropy", spy)
    method._loss(model, inputs, targets, np.random.default_rng(0))
    expected = sorted(int(x) for row in batch for x in row[1:])  # never a row's first item
    assert sorted(seen["targets"].tolist()) == expected


def test_same_seed_gives_byte_identical_rankings(planted):
    data, test = planted
    runs = []
    for seed in (7, 7, 8):
        method = sasrec.SASRec(_params(epochs=3), _ctx(data, seed=seed))
        method.fit(data)
        runs.append(method.rank(_full(test, k=20)))
    a, b, c = runs
    assert a.items.tobytes() == b.items.tobytes()
    assert a.scores.tobytes() == b.scores.tobytes()
    assert a.scores.tobytes() != c.scores.tobytes()  # the seed matters


def test_fit_leaves_global_torch_rng_untouched(planted):
    data, _ = planted
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sasrec.SASRec(_params(epochs=1), _ctx(data)).fit(data)
    assert torch.equal(torch.rand(3), expected)


def test_initial_item_embeddings_fill_the_table(planted):
    data, _ = planted
    arr = np.random.default_rng(3).normal(size=(N_ITEMS, 16)).astype(np.float32)
    method = sasrec.SASRec(_params(), _ctx(data), init_item_embeddings=arr)
    model = method.build_model(N_ITEMS)
    assert np.array_equal(model.item_emb.weight[1:].detach().numpy(), arr)
    assert not model.item_emb.weight[0].any()  # padding row stays zero
    method.params = dataclasses.replace(method.params, epochs=0)
    method.fit(data)  # no training: the table is exactly the given array
    assert np.array_equal(method.item_embeddings(), arr)
    method.params = dataclasses.replace(method.params, epochs=1)
    method.fit(data)  # training moves it from there
    assert not np.array_equal(method.item_embeddings(), arr)


def test_initial_item_embeddings_shape_mismatch_raises(planted):
    data, _ = planted
    method = sasrec.SASRec(_params(), _ctx(data))
    with pytest.raises(ValueError, match="expected \\[n_items, 16\\]"):
        method.set_initial_item_embeddings(np.zeros((N_ITEMS, 8)))
    with pytest.raises(ValueError, match="expected"):
        method.set_initial_item_embeddings(np.zeros(N_ITEMS * 16))
    method.set_initial_item_embeddings(np.zeros((N_ITEMS + 1, 16)))
    with pytest.raises(ValueError, match="catalog has 30 items"):
        method.fit(data)
    with pytest.raises(ValueError):
        sasrec.SASRec(_params(), _ctx(data), init_item_embeddings=np.full((N_ITEMS, 16), np.nan))


def test_candidate_restriction_is_respected(planted, trained):
    _, test = planted
    rng = np.random.default_rng(5)
    cand = np.full((N_USERS, 6), PAD, dtype=np.int64)
    for row in range(N_USERS):
        n = int(rng.integers(2, 7))
        cand[row, :n] = rng.choice(N_ITEMS, size=n, replace=False)
    request = RankRequest(test.users, test.histories, CandidateSet("sampled:5", test.users, cand, False), k=10)
    ranked = trained.rank(request)
    for row in range(N_USERS):
        allowed = set(cand[row][cand[row] >= 0].tolist())
        got = ranked.items[row][ranked.items[row] != PAD]
        assert set(got.tolist()) == allowed  # every candidate, nothing else
        assert len(got) == len(set(got.tolist()))
        assert np.all(ranked.items[row][len(allowed) :] == PAD)
        assert np.all(np.diff(ranked.scores[row][: len(allowed)]) <= 0)


def test_seen_items_are_never_returned(planted, trained):
    _, test = planted
    ranked = trained.rank(_full(test, k=N_ITEMS))
    for row, hist in enumerate(test.histories):
        got = ranked.items[row][ranked.items[row] != PAD]
        assert not set(got.tolist()) & set(hist.tolist())
        assert len(got) == N_ITEMS - len(set(hist.tolist()))


def test_empty_history_still_ranks(trained):
    users = np.array([0, 1], dtype=np.int64)
    histories = [np.array([], dtype=np.int64), np.array([4], dtype=np.int64)]
    request = RankRequest(users, histories, CandidateSet("full", users, None, True), k=5)
    ranked = trained.rank(request)
    assert np.all(ranked.items >= 0) and np.all(np.isfinite(ranked.scores))
    assert ranked.items[1, 0] == 5  # the planted rule: after item 4 comes item 5


def test_early_stopping_keeps_best_epoch(planted):
    data, _ = planted
    scores = iter([0.5, 0.9, 0.4, 0.3, 0.2, 0.1, 0.0])
    method = sasrec.SASRec(_params(epochs=50, patience=3), _ctx(data))
    method.ctx.validate = lambda ranked: {"ndcg@10": next(scores)}
    method.fit(data)
    notes = method.ctx.notes["sasrec"]
    assert notes["epochs_run"] == 5  # best at epoch 2, then 3 evaluations without improvement
    assert notes["best_epoch"] == 2
    assert notes["best_valid_ndcg@10"] == 0.9
    assert notes["stopped_by"] == "early_stopping"


def test_time_budget_stops_after_one_epoch(planted):
    data, _ = planted
    method = sasrec.SASRec(_params(epochs=50, max_train_seconds=1e-9), _ctx(data))
    method.fit(data)
    notes = method.ctx.notes["sasrec"]
    assert (notes["epochs_run"], notes["best_epoch"], notes["stopped_by"]) == (1, 1, "max_train_seconds")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("loss=hinge", "sasrec.loss='hinge': must be one of ce, bce"),
        ("hidden=10 heads=3", "hidden (10) must be divisible by heads (3)"),
        ("epochs=0", "sasrec.epochs=0: must be >= 1"),
        ("patience=-1", "sasrec.patience=-1: must be >= 1"),
        ("lr=-1", "sasrec.lr=-1.0: must be > 0"),
        ("lr=nan", "sasrec.lr=nan: must be a finite number"),
        ("dropout=1", "sasrec.dropout=1.0: must be >= 0 and < 1"),
        ("device=tpu", "sasrec.device=tpu: unknown device"),
    ],
)
def test_bad_params_are_rejected_when_resolved(setting, message):
    from benchmark.config import parse_sets
    from benchmark.runner import resolve_method

    with pytest.raises(ConfigError) as err:
        resolve_method("sasrec", parse_sets([f"sasrec.{kv}" for kv in setting.split()]))
    assert message in str(err.value)


def test_the_v1_preset_keeps_the_bounds_of_the_fields_it_redefines():
    from benchmark.config import parse_sets
    from benchmark.runner import resolve_method

    assert resolve_method("sasrec_v1", {}).params.epochs == 200
    with pytest.raises(ConfigError, match="sasrec_v1.epochs=0: must be >= 1"):
        resolve_method("sasrec_v1", parse_sets(["sasrec_v1.epochs=0"]))


def test_unfitted_rank_raises(planted):
    _, test = planted
    method = sasrec.SASRec(_params(), _ctx(planted[0]))
    with pytest.raises(Exception, match="before fit"):
        method.rank(_full(test))


def test_fitted_model_is_cached_by_fingerprint_and_reloaded(tmp_path):
    data, test = _planted_split()
    request = RankRequest(test.users, test.histories, CandidateSet("full", test.users), k=10)

    def fit(seed: int) -> sasrec.SASRec:
        ctx = _ctx(data, seed=seed)
        ctx.cache_dir = tmp_path
        model = sasrec.SASRec(_params(epochs=2), ctx)
        model.fit(data)
        return model

    first = fit(0)
    assert "loaded_from" not in first.ctx.notes["sasrec"]
    assert len(list((tmp_path / "models").glob("sasrec-*.pt"))) == 1
    again = fit(0)
    assert again.ctx.notes["sasrec"]["loaded_from"].startswith(str(tmp_path))
    np.testing.assert_array_equal(first.rank(request).items, again.rank(request).items)
    other = fit(1)  # another seed is another model
    assert "loaded_from" not in other.ctx.notes["sasrec"]
    assert len(list((tmp_path / "models").glob("sasrec-*.pt"))) == 2
