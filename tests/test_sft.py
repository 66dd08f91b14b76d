"""SFT end to end on tiny synthetic data with a tiny random Llama (seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import baselines.sft  # noqa: F401  (registers "sft" even before the lead lists it in baselines/__init__)
from benchmark.config import resolve_params
from benchmark.errors import ConfigError
from benchmark.llm.loading import tiny_llm
from benchmark.registry import RunContext, get_method
from benchmark.types import PAD, CandidateSet, Catalog, EvalSet, TrainData
from ranking_checks import check_rows, request_for

TITLES = ["Toy Story", "Heat", "GoldenEye", "Casino", "Babe", "Se7en", "Fargo", "Heat", "Twister", "Clerks"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local model directory."""
    llm = tiny_llm(hidden=32, layers=2)
    d = tmp_path_factory.mktemp("tiny-llm")
    llm.model.save_pretrained(d)
    llm.tokenizer.save_pretrained(d)
    return d


def tiny_data() -> TrainData:
    rng = np.random.default_rng(0)
    n_items = len(TITLES)
    catalog = Catalog(
        raw_ids=[str(i + 1) for i in range(n_items)],
        titles=TITLES,
        years=[1995] * 7 + [1986, 1996, 1994],  # two "Heat" items: same title, different year
        genres=[""] * n_items,
    )
    train = [rng.permutation(n_items)[:5].astype(np.int64) for _ in range(6)]
    users = np.arange(6, dtype=np.int64)
    valid = EvalSet(users, np.array([int(np.setdiff1d(np.arange(n_items), s)[0]) for s in train]), train)
    return TrainData("tiny", "loo", "fp-tiny", 6, n_items, catalog, train, valid)


def make(model_dir: Path, tmp_path: Path, **overrides):
    cls = get_method("sft")
    params = resolve_params(
        "sft", cls.Params,
        {"sft": {"llm": str(model_dir), "max_train_examples": 8, "epochs": 1, "batch_size": 4, "grad_accum": 1,
                 "num_beams": 4, "eval_batch_size": 4, "valid_users": 3, "precision": "fp32", "grounding": "trie",
                 "warmup_steps": 0, **overrides}},
    )
    scores = []

    def validate(ranked):
        scores.append(ranked)
        return {"ndcg@10": 0.0}

    ctx = RunContext(seed=0, device="cpu", work_dir=tmp_path / "work", validate=validate, progress=False)
    return cls(params, ctx), scores


def test_sft_fit_rank_trie_returns_k_distinct_unseen_catalog_items(model_dir, tmp_path):
    data = tiny_data()
    method, _ = make(model_dir, tmp_path)
    method.fit(data)
    assert method.n_train == 8
    request = request_for(data, k=3)
    ranked = method.rank(request)
    assert ranked.items.shape == (6, 3)
    check_rows(ranked, request, data.n_items)
    # each user saw 6 of 10 items: 4 remain, so k=3 lists are full
    assert (ranked.items != PAD).all()
    assert np.all(np.diff(ranked.scores, axis=1) <= 1e-6)  # best first
    assert (ranked.extras["valid"] == 1).all()
    assert ranked.info["grounding"] == "trie" and ranked.info["train_examples"] == 8
    assert method.ctx.notes["sft"]["steps"] == 2
    assert 0 < method.ctx.notes["sft"]["valid_loss"] < 20  # reported even when it selects nothing


def test_sft_respects_sampled_candidates(model_dir, tmp_path):
    data = tiny_data()
    method, _ = make(model_dir, tmp_path, early_stopping="none")
    method.fit(data)
    users = data.valid.users
    cands = np.full((6, 3), PAD, dtype=np.int64)
    for row, (h, t) in enumerate(zip(data.valid.histories, data.valid.targets)):
        unseen = np.setdiff1d(np.arange(data.n_items), np.append(h, t))
        cands[row, :2] = unseen[:2]
    request = request_for(data, k=3, candidates=CandidateSet("sampled:2", users, cands))
    ranked = method.rank(request)
    check_rows(ranked, request, data.n_items)
    for row in range(6):
        real = ranked.items[row][ranked.items[row] != PAD]
        assert set(real.tolist()) <= set(cands[row][cands[row] >= 0].tolist())
        assert len(real) == 2  # both candidates, then PAD: the candidate set is shorter than k
    assert ranked.info["filled_positions"] == 0


def test_sft_ndcg_early_stopping_ranks_validation_users(model_dir, tmp_path):
    data = tiny_data()
    method, seen = make(model_dir, tmp_path, early_stopping="ndcg", eval_every=1)
    method.fit(data)
    assert len(seen) == 2 and len(seen[0].users) == 3  # one validation per step, the seeded subset
    assert method.result.best_score == 0.0 and method.result.best_step == 1  # ties keep the first


@pytest.mark.parametrize("grounding", ["l2", "exact", "likelihood"])
def test_sft_free_generation_groundings(model_dir, tmp_path, grounding):
    pytest.importorskip("benchmark.grounding")
    data = tiny_data()
    method, _ = make(model_dir, tmp_path, grounding=grounding, max_new_tokens=6, early_stopping="none")
    method.fit(data)
    request = request_for(data, k=3)
    ranked = method.rank(request)
    check_rows(ranked, request, data.n_items)
    assert set(np.unique(ranked.extras["valid"]).tolist()) <= {0.0, 1.0}
    assert ranked.info["grounding"] == grounding


def test_cpu_threads_are_restored():
    import torch

    from benchmark.llm.precision import cpu_threads

    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_sft_rejects_bad_params():
    cls = get_method("sft")
    with pytest.raises(ConfigError):
        resolve_params("sft", cls.Params, {"sft": {"grounding": "nearest"}})
    with pytest.raises(ConfigError):
        resolve_params("sft", cls.Params, {"sft": {"max_train_examples": "lots"}})
    with pytest.raises(ConfigError, match="must be >= 1"):
        resolve_params("sft", cls.Params, {"sft": {"num_beams": 0}})


def test_refit_on_a_finished_checkpoint_is_marked_loaded_with_the_original_training_time(model_dir, tmp_path):
    data = tiny_data()
    first, _ = make(model_dir, tmp_path, early_stopping="none")
    first.fit(data)
    notes = dict(first.ctx.notes["sft"])
    assert "loaded_from" not in notes and notes["train_seconds"] > 0
    again, _ = make(model_dir, tmp_path, early_stopping="none")  # same work dir: the finished checkpoint
    again.fit(data)
    assert again.ctx.notes["sft"]["loaded_from"]
    assert again.ctx.notes["sft"]["train_seconds"] == pytest.approx(notes["train_seconds"], abs=0.05)


def test_zero_shot_and_last_position_points_of_the_learning_curve(model_dir, tmp_path):
    data = tiny_data()
    zero, _ = make(model_dir, tmp_path / "z", max_train_examples=0)
    zero.fit(data)
    assert zero.n_train == 0 and zero.ctx.notes["sft"]["steps"] == 0 and zero.ctx.notes["sft"]["valid_loss"] > 0
    check_rows(zero.rank(request_for(data, k=3)), request_for(data, k=3), data.n_items)
    last, _ = make(model_dir, tmp_path / "l", train_positions="last", max_train_examples=None)
    pairs = last._pairs(data, cap=None)
    assert pairs == [(u, len(seq) - 1) for u, seq in enumerate(data.train)]  # one per user, the latest


def test_short_generative_lists_are_filled_to_k_with_the_most_popular_unseen_items(model_dir, tmp_path):
    from benchmark.ranking import popularity_order

    data = tiny_data()
    method, _ = make(model_dir, tmp_path, num_beams=1, early_stopping="none")  # one beam finds few items
    method.fit(data)
    request = request_for(data, k=4)
    ranked = method.rank(request)
    check_rows(ranked, request, data.n_items)
    assert (ranked.items != PAD).all()  # K items for every user: 4 unseen items each
    popular = popularity_order(data.train, data.n_items)
    for row, filled in enumerate(ranked.extras["filled"].astype(int)):
        if filled:  # the filled tail is the popularity order of the items still allowed
            tail = ranked.items[row, 4 - filled:].tolist()
            allowed = [i for i in popular.tolist() if i not in set(request.histories[row].tolist())
                       and i not in set(ranked.items[row, : 4 - filled].tolist())]
            assert tail == allowed[:filled]
    assert ranked.info["filled_positions"] == int(ranked.extras["filled"].sum()) > 0
