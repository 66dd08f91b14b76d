"""P2Rec on tiny synthetic data with a tiny random Llama and a tiny SASRec (seconds on CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines.p2rec as p2rec
import baselines.sasrec as sasrec
from benchmark.config import resolve_params
from benchmark.data.synthetic import tiny_split
from benchmark.errors import ConfigError
from benchmark.llm.kmeans import kmeans
from benchmark.llm.loading import tiny_llm
from benchmark.llm.pooling import batch_ids, pooled_hidden
from benchmark.llm.training import prepare_model, TrainConfig
from benchmark import registry
from benchmark.registry import Method, RunContext, get_method
from benchmark.types import PAD, CandidateSet, RankRequest

LLM_HIDDEN = 32
SASREC_HIDDEN = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local model directory."""
    llm = tiny_llm(hidden=LLM_HIDDEN, layers=2)
    d = tmp_path_factory.mktemp("tiny-llm")
    llm.model.save_pretrained(d)
    llm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def split():
    return tiny_split(seed=0, n_users=24, n_items=30)


def _validate(ranked):
    return {"ndcg@10": 0.0}


def _sasrec_params(**kw) -> sasrec.SASRecParams:
    base = dict(hidden=SASREC_HIDDEN, blocks=1, heads=1, max_len=20, epochs=2, batch_size=16, patience=5)
    base.update(kw)
    return sasrec.SASRecParams(**base)


@pytest.fixture(scope="module")
def pretrained(split, tmp_path_factory):
    ctx = RunContext(seed=0, device="cpu", work_dir=tmp_path_factory.mktemp("sasrec"), validate=_validate,
                     progress=False)
    method = sasrec.SASRec(_sasrec_params(), ctx)
    method.fit(split.train_data())
    return method


def make(model_dir: Path, work: Path, fitted, **overrides) -> p2rec.P2Rec:
    params = resolve_params(
        "p2rec", p2rec.P2RecParams,
        {"p2rec": {"llm": str(model_dir), "n_clusters": 4, "history_len": 6, "epochs": 1, "batch_size": 4,
                   "valid_users": 4, "max_users": "all", "embed_batch_size": 8, **overrides}},
    )
    ctx = RunContext(seed=0, device="cpu", work_dir=work, validate=_validate, progress=False,
                     method_loader=lambda name: fitted)
    return p2rec.P2Rec(params, ctx)


# -- pieces ------------------------------------------------------------------------------------------


def test_preference_targets_match_a_hand_count():
    labels = np.array([0, 0, 1, 2, 1, 2])  # item -> latent category
    seqs = [np.array([0, 1, 2, 2]), np.array([5]), np.array([3, 4, 0, 5, 3])]
    g = p2rec.preference_targets(seqs, labels, k=3)
    expected = np.array([[2 / 4, 2 / 4, 0], [0, 0, 1], [1 / 5, 1 / 5, 3 / 5]], dtype=np.float32)
    np.testing.assert_allclose(g, expected, rtol=1e-6)
    np.testing.assert_allclose(g.sum(1), 1.0, rtol=1e-6)
    # only the items a prompt shows: the last 2 of user 2 are items 5, 3 -> categories 2, 2
    np.testing.assert_allclose(p2rec.preference_targets(seqs, labels, 3, last=2)[2], [0, 0, 1])


def test_kmeans_is_seeded_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 20
    truth = np.repeat(np.arange(4), 25)
    x = centres[truth] + rng.normal(size=(100, 6))
    a, b = kmeans(x, 4, seed=3), kmeans(x, 4, seed=3)
    assert np.array_equal(a.labels, b.labels)
    # a perfect clustering up to label permutation: each found cluster is one true cluster
    for c in range(4):
        assert len(np.unique(truth[a.labels == c])) == 1
    assert sorted(a.sizes().tolist()) == [25, 25, 25, 25]
    # fewer distinct points than k still gives k non-empty clusters
    dup = kmeans(np.repeat(np.eye(2), 3, axis=0), 3, seed=0)
    assert (dup.sizes() > 0).all()
    with pytest.raises(ConfigError, match="k must be between"):
        kmeans(x[:3], 4)


def test_shared_prefix_embeddings_equal_full_prompts():
    llm = tiny_llm(hidden=LLM_HIDDEN, layers=2)
    model = prepare_model(llm.model, TrainConfig(lora=True))  # a peft-wrapped model, as after training
    template = p2rec.TEMPLATES["movie"]
    from benchmark.llm.prompts import prompt_ids_batch

    ids = prompt_ids_batch(llm, template, [["Heat (1995)"], ["Toy Story (1995)"], ["Se7en (1995)"], ["Fargo"]])
    for pooling in ("mean", "last"):
        got, prefix = p2rec.embed_shared_prefix(model, ids, pad_id=llm.pad_id, pooling=pooling, batch_size=3)
        full = batch_ids(ids, llm.pad_id)
        with torch.no_grad():
            ref = pooled_hidden(model, full["input_ids"], full["attention_mask"], pooling)
        assert prefix >= 10  # the instruction is shared
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_projection_pca_shapes_centring_and_scale():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 32)) + 5.0
    out = p2rec.project_embeddings(emb, 16, method="pca", target_std=0.1)
    assert out.shape == (30, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-6)
    assert abs(float(out.std()) - 0.1) < 1e-5
    variances = out.var(0)
    assert np.all(np.diff(variances) <= 1e-9)  # principal components, largest first
    # more width than components: zero columns after the available ones
    wide = p2rec.project_embeddings(emb[:5], 16, method="pca", target_std=0.1)
    assert wide.shape == (5, 16) and np.allclose(wide[:, 5:], 0.0)
    head = p2rec.project_embeddings(emb, 16, method="head", target_std=0.1,
                                    head_weight=rng.normal(size=(4, 32)), head_bias=np.zeros(4))
    assert head.shape == (30, 16)
    assert np.linalg.matrix_rank(head) <= 4  # it goes through the K=4 head outputs


# -- the method ------------------------------------------------------------------------------------------


def test_fit_one_example_per_user_and_downstream_starts_from_llm_embeddings(
    model_dir, tmp_path, split, pretrained, monkeypatch
):
    data = split.train_data()
    seen_examples = []
    real_train = p2rec.train

    def spy_train(model, examples, config, **kw):
        seen_examples.append(list(examples))
        assert "p2rec_head.weight" in dict(model.named_parameters())  # the head trains with the adapters
        return real_train(model, examples, config, **kw)

    built = []
    real_build = sasrec.SASRec.build_model

    def spy_build(self, n_items):
        model = real_build(self, n_items)
        built.append(model.item_emb.weight[1:].detach().clone().numpy())
        return model

    monkeypatch.setattr(p2rec, "train", spy_train)
    monkeypatch.setattr(sasrec.SASRec, "build_model", spy_build)
    method = make(model_dir, tmp_path / "work", pretrained)
    method.fit(data)

    # exactly one fine-tuning example per user, users disjoint from the held-out ones
    eligible = [u for u in range(data.n_users) if len(data.train[u])]
    assert len(seen_examples) == 1
    assert len(seen_examples[0]) == len(method.train_users) == len(set(method.train_users.tolist()))
    assert len(method.train_users) + len(method.valid_users) == len(eligible)
    assert not set(method.train_users.tolist()) & set(method.valid_users.tolist())
    notes = method.ctx.notes["p2rec"]
    assert notes["train_examples"] == notes["train_users"] == len(method.train_users) == 20
    assert notes["instance_level_examples"] > 3 * notes["train_examples"]

    # targets: normalised counts of each user's training items over the k-means categories
    labels = kmeans(pretrained.item_embeddings(), 4, seed=0, n_init=4).labels
    assert np.array_equal(method.labels, labels)
    for row, u in enumerate(method.train_users):
        hand = np.bincount(labels[data.train[u]], minlength=4) / len(data.train[u])
        np.testing.assert_allclose(method.targets[row], hand, rtol=1e-6)
        np.testing.assert_allclose(seen_examples[0][row][1], hand, rtol=1e-6)
    np.testing.assert_allclose(method.targets.sum(1), 1.0, rtol=1e-6)
    assert sum(notes["cluster_sizes"]) == data.n_items and len(notes["cluster_sizes"]) == 4

    # the downstream model starts from the projected LLM embeddings
    assert method.llm_embeddings.shape == (data.n_items, LLM_HIDDEN)
    expected = p2rec.project_embeddings(
        method.llm_embeddings, SASREC_HIDDEN, method="pca", seed=0,
        target_std=p2rec.xavier_std(data.n_items, SASREC_HIDDEN),
    )
    assert method.init_embeddings.shape == (data.n_items, SASREC_HIDDEN)
    np.testing.assert_allclose(method.init_embeddings, expected, rtol=1e-5, atol=1e-7)
    assert len(built) == 1
    np.testing.assert_array_equal(built[0], method.init_embeddings)
    assert method.downstream is not pretrained and method.downstream.params == pretrained.params
    assert not np.allclose(method.downstream.item_embeddings(), pretrained.item_embeddings())

    # serving: the downstream ranks, valid lists
    users = data.valid.users
    request = RankRequest(users, data.valid.histories, CandidateSet("full", users), k=5)
    ranked = method.rank(request)
    assert ranked.items.shape == (len(users), 5) and (ranked.items != PAD).all()
    for row, hist in enumerate(data.valid.histories):
        assert not set(ranked.items[row].tolist()) & set(hist.tolist())
    assert ranked.info["method"] == "p2rec" and ranked.info["downstream"] == "sasrec"
    assert notes["downstream"]["notes"]["epochs_run"] == 2
    assert notes["pretrained"]["notes"]["epochs_run"] == 2
    assert notes["valid_users"] == 4 and notes["valid_mse"] is not None and notes["valid_mse_constant"] > 0


def test_second_fit_reuses_checkpoint_and_embedding_cache(model_dir, tmp_path, split, pretrained, monkeypatch):
    data = split.train_data()
    first = make(model_dir, tmp_path / "work", pretrained, loss="kl", item_repr="id")
    first.fit(data)
    n1 = first.ctx.notes["p2rec"]
    assert n1["embeddings_cached"] is False and n1["steps"] == 5
    ckpt = tmp_path / "work" / "checkpoint" / "trainable.safetensors"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt))
    assert torch.equal(saved["p2rec_head.weight"], first.head.weight.detach())

    def no_embedding(*a, **kw):
        raise AssertionError("the cached embeddings should have been reused")

    monkeypatch.setattr(p2rec, "embed_shared_prefix", no_embedding)
    monkeypatch.setattr(p2rec, "embed_batches", no_embedding)
    second = make(model_dir, tmp_path / "work", pretrained, loss="kl", item_repr="id")
    second.fit(data)
    n2 = second.ctx.notes["p2rec"]
    assert n2["embeddings_cached"] is True and n2["embedding_cache"] == n1["embedding_cache"]
    assert n2["resumed_from"] == n1["steps"]  # nothing retrained
    # the cost is the checkpoint's, across attempts, not this process's nothing
    assert n2["tokens_this_process"] == 0 and n2["tokens_processed"] == n1["tokens_processed"] > 0
    assert n2["llm_stage_seconds"] >= n1["train_seconds"]
    torch.testing.assert_close(second.head.weight, first.head.weight)
    np.testing.assert_array_equal(second.llm_embeddings, first.llm_embeddings)
    np.testing.assert_array_equal(second.init_embeddings, first.init_embeddings)


def test_add_init_and_random_projection(model_dir, tmp_path, split, pretrained):
    data = split.train_data()
    method = make(model_dir, tmp_path / "w", pretrained, init="add", projection="random", epochs=1,
                  max_users=5, valid_users=0, early_stopping="none")
    method.fit(data)
    assert method.ctx.notes["p2rec"]["train_examples"] == 5
    std = p2rec.xavier_std(data.n_items, SASREC_HIDDEN)
    proj = p2rec.project_embeddings(method.llm_embeddings, SASREC_HIDDEN, method="random", seed=0, target_std=std)
    noise = method.init_embeddings - proj
    assert noise.shape == (data.n_items, SASREC_HIDDEN)
    assert abs(float(noise.std()) - std) < 0.3 * std  # a xavier-normal random table underneath
    assert not np.allclose(noise, 0.0)


def test_bad_configs_raise_clear_config_errors(model_dir, tmp_path, split, pretrained, monkeypatch):
    with pytest.raises(ConfigError, match="set_initial_item_embeddings"):
        make(model_dir, tmp_path, pretrained, downstream="pop")

    class NoInit(Method):
        @dataclasses.dataclass
        class Params:
            hidden: int = 16

    get_method("pop")  # load the built-ins first, then add a throwaway method for this test only
    monkeypatch.setitem(registry._REGISTRY, "p2rec-test-noinit", NoInit)

    with pytest.raises(ConfigError, match="set_initial_item_embeddings"):
        make(model_dir, tmp_path, pretrained, downstream="p2rec-test-noinit")
    with pytest.raises(ConfigError, match="item_embeddings"):
        make(model_dir, tmp_path, pretrained, pretrained="pop")
    method = make(model_dir, tmp_path, pretrained, n_clusters=split.n_items + 1)
    with pytest.raises(ConfigError, match="larger than the catalog"):
        method.fit(split.train_data())
    for bad in ({"loss": "hinge"}, {"projection": "umap"}, {"init": "concat"}, {"n_clusters": 1},
                {"item_repr": "emoji"}):
        with pytest.raises(ConfigError):
            resolve_params("p2rec", p2rec.P2RecParams, {"p2rec": bad})
    with pytest.raises(ConfigError, match="max_users"):
        resolve_params("p2rec", p2rec.P2RecParams, {"p2rec": {"max_users": "lots"}})
    with pytest.raises(ConfigError, match="before fit"):
        make(model_dir, tmp_path, pretrained).rank(
            RankRequest(np.array([0]), [np.array([1])], CandidateSet("full", np.array([0])), 5)
        )


def test_registered_with_device_defaults():
    cls = get_method("p2rec")
    assert cls is p2rec.P2Rec and cls.uses_llm
    from benchmark.recipes import resolve_recipe

    cpu = resolve_recipe(cls, "p2rec", {}, device_type="cpu").params
    gpu = resolve_recipe(cls, "p2rec", {}, device_type="cuda").params
    assert (cpu.history_len, cpu.epochs, cpu.max_users, cpu.valid_users) == (20, 1, 256, 32)
    assert (gpu.history_len, gpu.epochs, gpu.max_users, gpu.valid_users) == (50, 3, None, 256)
    assert cls.Params().n_clusters == 32 and cls.Params().loss == "mse" and cls.Params().pooling == "mean"


def test_full_finetuning_with_validation_early_stopping(model_dir, tmp_path, split, pretrained):
    data = split.train_data()
    method = make(model_dir, tmp_path / "w", pretrained, lora=False, epochs=2, max_users=8, pooling="last")
    method.fit(data)
    notes = method.ctx.notes["p2rec"]
    assert notes["steps"] == 4 and notes["best_step"] in (2, 4)  # validated after each of the 2 epochs
    assert notes["best_score"] == pytest.approx(-notes["valid_mse"], rel=1e-4)  # best weights restored
    assert method.init_embeddings.shape == (data.n_items, SASREC_HIDDEN)


def test_the_leaderboard_note_counts_every_attempt_and_says_when_the_llm_stage_was_resumed():
    params = p2rec.P2RecParams()
    cost = {"train_examples": 256, "instance_level_examples": 9000, "tokens_processed": 120000,
            "llm_stage_seconds": 400.1, "embedding_seconds": 2.0, "resumed_from": 0, "prior_train_seconds": 0.0}
    fresh = p2rec.leaderboard_note(cost, params)
    assert "120000 tokens, 400.1 s incl. 2.0 s of item embedding" in fresh and "resumed" not in fresh
    # a stage loaded from its finished step-32 checkpoint trained nothing in this process: the note
    # must not read "0 tokens, 3.66 s" as if it were the cost
    loaded = p2rec.leaderboard_note({**cost, "resumed_from": 32, "prior_train_seconds": 387.7}, params)
    assert loaded.endswith("resumed from its step-32 checkpoint (387.7 s of training before the resume)")
    unknown = p2rec.leaderboard_note({**cost, "tokens_processed": None, "resumed_from": 32}, params)
    assert "an unrecorded number of tokens" in unknown
