"""CALRec: InfoNCE, span pooling, BM25 grounding, sampling, and fit/rank end to end (tiny model)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines.calrec  # noqa: F401  (registers "calrec")
from baselines.calrec import CALRecParams, parse_specs, sample_generations
from benchmark.config import resolve_params
from benchmark.data.synthetic import tiny_split
from benchmark.errors import ConfigError
from benchmark.grounding import BM25Index, ground_bm25, interleave_round_robin
from benchmark.llm.contrastive import info_nce, span_mean, text_groups
from benchmark.llm.pooling import embed_batches
from benchmark.llm.loading import tiny_llm
from benchmark.llm.training import example_loss
from benchmark.llm.two_tower import calrec_collate, calrec_terms
from benchmark.registry import RunContext, get_method
from benchmark.types import PAD, CandidateSet, Catalog, EvalSet, TrainData
from ranking_checks import check_rows, request_for

TITLES = ["Toy Story", "Heat", "GoldenEye", "Casino", "Babe", "Se7en", "Fargo", "Heat", "Twister", "Clerks"]
YEARS = [1995] * 7 + [1986, 1996, 1994]


# -- InfoNCE -----------------------------------------------------------------------------------


def _hand_info_nce(q, k, tau, masked=(), direction="q2k"):
    """-log softmax by explicit loops over python floats."""
    n = len(q)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    s = [[cos(q[i], k[j]) / tau for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        if direction == "q2k":
            others = [s[i][j] for j in range(n) if (i, j) not in masked]
        else:
            others = [s[j][i] for j in range(n) if (j, i) not in masked]
        losses.append(-(s[i][i] - math.log(sum(math.exp(v) for v in others))))
    return losses


Q = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
K = [[0.8, 0.6], [1.0, 1.0], [-1.0, 0.5]]


@pytest.mark.parametrize("direction", ["q2k", "k2q"])
def test_info_nce_equals_hand_computation(direction):
    tau = 0.5
    got = info_nce(torch.tensor(Q), torch.tensor(K), tau, direction=direction, reduction="none")
    assert got.tolist() == pytest.approx(_hand_info_nce(Q, K, tau, direction=direction), rel=1e-5)
    mean = info_nce(torch.tensor(Q), torch.tensor(K), tau, direction=direction)
    assert float(mean) == pytest.approx(float(np.mean(_hand_info_nce(Q, K, tau, direction=direction))), rel=1e-5)
    both = info_nce(torch.tensor(Q), torch.tensor(K), tau, direction="both", reduction="sum")
    expect = (np.array(_hand_info_nce(Q, K, tau)) + np.array(_hand_info_nce(Q, K, tau, direction="k2q"))) / 2
    assert float(both) == pytest.approx(float(expect.sum()), rel=1e-5)


def test_info_nce_duplicate_targets_are_not_negatives():
    tau = 0.5
    groups = [7, 3, 7]  # rows 0 and 2 share a target: (0, 2) and (2, 0) leave the softmax
    got = info_nce(torch.tensor(Q), torch.tensor(K), tau, groups=groups, reduction="none")
    assert got.tolist() == pytest.approx(_hand_info_nce(Q, K, tau, masked={(0, 2), (2, 0)}), rel=1e-5)
    # identical keys: without groups each is a hard negative of the others (loss log n);
    # grouped, only the positive stays in each denominator (loss 0)
    q = torch.randn(4, 3)
    k = torch.ones(4, 3)
    assert float(info_nce(q, k, 0.1)) == pytest.approx(math.log(4), rel=1e-5)
    assert float(info_nce(q, k, 0.1, groups=[1, 1, 1, 1], direction="both")) == pytest.approx(0.0, abs=1e-6)
    # the positive itself is never masked, and one pair alone has no negatives
    assert float(info_nce(q[:1], k[:1], 0.1)) == pytest.approx(0.0, abs=1e-6)


def test_info_nce_gradient_pulls_positive_pairs_together():
    q = torch.tensor(Q, requires_grad=True)
    k = torch.tensor(K)
    loss = info_nce(q, k, 0.1)
    loss.backward()
    with torch.no_grad():
        before = torch.nn.functional.cosine_similarity(q, k).sum()
        after = torch.nn.functional.cosine_similarity(q - 0.01 * q.grad, k).sum()
    assert after > before


def test_span_mean_and_text_groups():
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    out = span_mean(hidden, torch.tensor([1, 0]), torch.tensor([3, 5]))
    assert out[0].tolist() == hidden[0, 1:3].mean(0).tolist()
    assert out[1].tolist() == hidden[1].mean(0).tolist()
    assert text_groups([[1, 2], [3], [1, 2], [4]]).tolist() == [0, 1, 0, 2]


# -- grounding -----------------------------------------------------------------------------------


def test_interleave_round_robin_order_and_dedup():
    lists = [[5, 1, 2, 9], [1, 3], [5, 4, 7]]
    # rank 0 of each list: 5, 1, (5 again); rank 1: (1 again), 3, 4; rank 2: 2, 7; rank 3: 9
    assert interleave_round_robin(lists, k=10) == [5, 1, 3, 4, 2, 7, 9]
    assert interleave_round_robin(lists, k=3) == [5, 1, 3]
    assert interleave_round_robin(lists, k=10, exclude={1, 4}) == [5, 3, 2, 7, 9]


def catalog_texts_tiny():
    return [f"{t} ({y})" for t, y in zip(TITLES, YEARS)]


def test_bm25_grounding_ranks_the_verbatim_title_first():
    texts = catalog_texts_tiny()
    index = BM25Index(texts)
    for item in [0, 1, 7, 9]:  # both "Heat" items: the year decides
        ranked = ground_bm25([[texts[item]]], index, k=3)
        assert ranked[0][0] == item
    ranked = ground_bm25([["Heat (1995)"]], index, k=3)[0]
    assert ranked.tolist()[:2] == [1, 7]  # the other Heat next (shares "heat")


def test_bm25_grounding_interleaves_generations_and_drops_excluded():
    texts = catalog_texts_tiny()
    gens = [["Heat (1986)", "Fargo (1995)", "Heat (1986)"]]
    ranked = ground_bm25(gens, texts, k=4)[0].tolist()
    # gen0 list: 7 (Heat 1986), 1 (Heat 1995), then 1995 items; gen1: 6 (Fargo), then the 1995 items
    assert ranked[:3] == [7, 6, 1]
    assert len(ranked) == len(set(ranked)) == 4
    excluded = ground_bm25(gens, texts, k=4, exclude=[np.array([7, 6])])[0].tolist()
    assert 7 not in excluded and 6 not in excluded and excluded[0] == 1
    # a generation sharing no word with any item retrieves nothing
    assert ground_bm25([["zzz qqq"]], texts, k=4)[0].tolist() == []
    # users are grounded in chunks: the chunking never changes a result
    many = [["Heat (1986)", "Casino"], ["Toy Story"], ["Babe (1995)", "Clerks (1994)", "Se7en"]] * 3
    ex = [np.array([i % 10]) for i in range(len(many))]
    whole = ground_bm25(many, texts, k=5, exclude=ex)
    for chunk in (1, 2):
        parts = ground_bm25(many, texts, k=5, exclude=ex, chunk_users=chunk)
        assert [p.tolist() for p in parts] == [w.tolist() for w in whole]


# -- model-level pieces -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    llm = tiny_llm(hidden=32, layers=2)
    d = tmp_path_factory.mktemp("tiny-llm")
    llm.model.save_pretrained(d)
    llm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(hidden=32, layers=2, seed=1)


def tiny_data() -> TrainData:
    rng = np.random.default_rng(0)
    n_items = len(TITLES)
    catalog = Catalog(raw_ids=[str(i + 1) for i in range(n_items)], titles=TITLES, years=YEARS, genres=[""] * n_items)
    train = [rng.permutation(n_items)[:5].astype(np.int64) for _ in range(6)]
    users = np.arange(6, dtype=np.int64)
    valid = EvalSet(users, np.array([int(np.setdiff1d(np.arange(n_items), s)[0]) for s in train]), train)
    return TrainData("tiny", "loo", "fp-tiny", 6, n_items, catalog, train, valid)


def make(model_dir: Path, work: Path, loader=None, **overrides):
    cls = get_method("calrec")
    params = resolve_params(
        "calrec", cls.Params,
        {"calrec": {"llm": str(model_dir), "max_train_examples": 8, "batch_size": 4, "grad_accum": 1, "epochs": 1,
                    "warmup_steps": 0, "precision": "fp32", "valid_users": 3, "n_samples": 3, "max_new_tokens": 6,
                    "eval_batch_size": 4, "embed_batch_size": 4, **overrides}},
    )
    ctx = RunContext(seed=0, device="cpu", work_dir=work, validate=lambda ranked: {"ndcg@10": 0.0},
                     dataset_loader=loader, progress=False)
    return cls(params, ctx)



def test_examples_spans_cover_history_and_target(model_dir, tmp_path):
    data = tiny_data()
    method = make(model_dir, tmp_path / "w")
    from baselines.calrec import PROMPTS
    from benchmark.llm.loading import load_llm

    method.llm = load_llm(str(model_dir))
    method.template = PROMPTS["movie"]
    method.texts = [f"{t} ({y})" for t, y in zip(TITLES, YEARS)]
    examples = method._domain_examples([(data.train, method.texts)], None)
    assert len(examples) == 6 * 4  # every position t >= 1 of six 5-item sequences
    tok = method.llm.tokenizer
    for ids, labels, start, plen, item in examples[:5]:
        assert tok.decode(item) in method.texts  # the target span is exactly an item's text
        assert tok.decode(ids[plen : plen + len(item)]) == tok.decode(item)
        user_part = tok.decode(ids[start:plen])
        assert "recommender" not in user_part and "recommend the one" not in user_part  # system + instruction
        assert "The user watched these" in user_part
    batch = calrec_collate(examples[:4], method.llm.pad_id)
    assert batch["item_input_ids"].shape[0] == 4 and batch["groups"].shape == (4,)


def test_loss_terms_match_sft_loss_and_reach_both_towers(llm):
    from baselines.calrec import PROMPTS, CALRec

    method = CALRec(CALRecParams(), RunContext(seed=0, device="cpu", work_dir=Path("."), validate=lambda r: {}))
    method.llm, method.template = llm, PROMPTS["movie"]
    texts = [f"{t} ({y})" for t, y in zip(TITLES, YEARS)]
    examples = method._encode([[texts[0], texts[2]], [texts[3]], [texts[4], texts[5]]], [texts[1], texts[1], texts[6]])
    batch = calrec_collate(examples, llm.pad_id)
    assert batch["groups"].tolist() == [0, 0, 1]  # the same target twice
    llm.model.zero_grad()
    terms = calrec_terms(llm.model, batch, tau=0.05, direction="both")
    # NIG: SFT's token cross-entropy, averaged per example
    for row, (ids, labels, *_rest) in enumerate(examples):
        one = {"input_ids": torch.as_tensor(ids[None], dtype=torch.long),
               "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
               "labels": torch.as_tensor(labels[None], dtype=torch.long)}
        ref, _ = example_loss(llm.model, one)
        assert float(terms["nig"][row].detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    # the user-tower span pooled in the batch equals pooling the prompt alone (causal model)
    ids, _, start, plen, _ = examples[2]
    alone = embed_batches(llm.model, [ids[:plen].tolist()], starts=[start], pad_id=llm.pad_id, progress=False)
    hidden = llm.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    in_batch = span_mean(hidden, batch["user_start"], batch["prompt_len"])[2]
    assert torch.allclose(alone[0], in_batch, atol=1e-4)
    (terms["tt"].sum() + terms["ut"].sum()).backward()
    grads = [p.grad for p in llm.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    llm.model.zero_grad()


def test_greedy_sampling_matches_transformers_generate(llm):
    prompts = [[10, 20, 30, 40], [50, 60]]
    out = sample_generations(llm.model, prompts, n_samples=2, temperature=0.0, max_new_tokens=5,
                             pad_id=llm.pad_id, eos_id=llm.eos_id, progress=False)
    for prompt, samples in zip(prompts, out):
        ref = llm.model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                 pad_token_id=llm.pad_id, eos_token_id=llm.eos_id)[0, len(prompt):].tolist()
        ref = ref[: ref.index(llm.eos_id)] if llm.eos_id in ref else ref
        assert samples[0][0] == ref and samples[1][0] == ref
        with torch.no_grad():
            full = torch.tensor([prompt + ref])
            logp = torch.log_softmax(llm.model(full).logits[0, len(prompt) - 1 : -1].float(), -1)
            expect = float(logp.gather(1, torch.tensor(ref)[:, None]).sum())
        if llm.eos_id not in ref and len(ref) == 5:
            assert samples[0][1] == pytest.approx(expect, abs=1e-3)
    a = sample_generations(llm.model, prompts, n_samples=4, temperature=1.0, max_new_tokens=5,
                           pad_id=llm.pad_id, eos_id=llm.eos_id, seed=3, progress=False)
    b = sample_generations(llm.model, prompts, n_samples=4, temperature=1.0, max_new_tokens=5,
                           pad_id=llm.pad_id, eos_id=llm.eos_id, seed=3, progress=False)
    assert a == b  # seeded
    assert len({tuple(s) for s, _ in a[0]}) > 1  # temperature 1 on a random model: samples differ


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bm25", "dense"])
def test_fit_rank_returns_valid_rankings(model_dir, tmp_path, mode):
    data = tiny_data()
    method = make(model_dir, tmp_path / "work", inference=mode)
    method.fit(data)
    notes = method.ctx.notes["calrec"]
    assert notes["stage1"] is None and notes["stage2"]["examples"] == 8 and notes["stage2"]["steps"] == 2
    request = request_for(data, k=3)
    ranked = method.rank(request)
    assert ranked.items.shape == (6, 3)
    check_rows(ranked, request, data.n_items)
    assert (ranked.items != PAD).all()  # 4 unseen items per user; bm25 backfills by popularity
    assert ranked.info["inference"] == mode and method.ctx.notes["calrec"]["inference"] == mode
    assert set(np.unique(ranked.extras["valid"]).tolist()) <= {0.0, 1.0}
    if mode == "dense":
        assert np.all(np.diff(ranked.scores, axis=1) <= 1e-6)
        assert notes["catalog_embeddings_cached"] is False and notes["catalog_embedding_seconds"] >= 0
    # sampled candidates: only candidates come back
    cands = np.full((6, 3), PAD, dtype=np.int64)
    for row, (h, t) in enumerate(zip(data.valid.histories, data.valid.targets)):
        cands[row, :2] = np.setdiff1d(np.arange(data.n_items), np.append(h, t))[:2]
    request = request_for(data, k=3, candidates=CandidateSet("sampled:2", data.valid.users, cands))
    ranked = method.rank(request)
    check_rows(ranked, request, data.n_items)
    for row in range(6):
        real = ranked.items[row][ranked.items[row] != PAD]
        assert set(real.tolist()) <= set(cands[row][cands[row] >= 0].tolist())


def test_stage1_trains_on_the_other_dataset_first(model_dir, tmp_path):
    data = tiny_data()
    calls = []

    def loader(spec):
        calls.append(spec)
        return tiny_split(seed=int(spec.rpartition("=")[2]), n_users=20, n_items=16)

    method = make(model_dir, tmp_path / "work", loader=loader, stage1="synthetic:seed=5", stage1_max_examples=12,
                  early_stopping="none")
    method.fit(data)
    assert calls == ["synthetic:seed=5"]
    s1 = method.ctx.notes["calrec"]["stage1"]
    assert s1["examples"] == 12 and s1["steps"] == 3 and len(s1["datasets"]) == 2  # target + synthetic
    assert (tmp_path / "work" / "stage1" / "checkpoint").is_dir()
    assert (tmp_path / "work" / "stage2" / "checkpoint").is_dir()
    fp_with = method.weights_fingerprint
    ranked = method.rank(request_for(data, k=3))
    assert (ranked.items != PAD).all()
    assert ranked.info["stage1_examples"] == 12
    # the same run without stage 1 ends at other weights
    plain = make(model_dir, tmp_path / "plain", early_stopping="none")
    plain.fit(data)
    assert plain.weights_fingerprint != fp_with
    # no loader: a clear error
    with pytest.raises(ConfigError):
        make(model_dir, tmp_path / "x", stage1="ml-1m").fit(data)


def test_catalog_embeddings_are_cached_and_reused(model_dir, tmp_path):
    data = tiny_data()
    work = tmp_path / "work"
    first = make(model_dir, work, inference="dense", early_stopping="none")
    first.fit(data)
    r1 = first.rank(request_for(data, k=3))
    assert first.ctx.notes["calrec"]["catalog_embeddings_cached"] is False
    files = list((work / "item_embeddings").glob("*.safetensors"))
    assert len(files) == 1 and first.weights_fingerprint in files[0].name
    emb = first.item_embeddings.clone()
    first.rank(request_for(data, k=3))
    assert first.item_embeddings is not None and torch.equal(first.item_embeddings, emb)  # kept in memory
    second = make(model_dir, work, inference="dense", early_stopping="none")
    second.fit(data)  # the finished checkpoint is reused: same weights, same fingerprint
    assert second.ctx.notes["calrec"]["stage2"]["resumed_from"] == 2
    # only loaded: the unit reports the first fit's training time as a cached fit's
    n1, n2 = first.ctx.notes["calrec"], second.ctx.notes["calrec"]
    assert "loaded_from" not in n1 and n1["prior_train_seconds"] == 0.0 and n1["train_seconds"] > 0
    assert n2["loaded_from"] and n2["train_seconds"] == pytest.approx(n1["train_seconds"], abs=0.05)
    assert n2["stage2"]["train_seconds"] == pytest.approx(n1["stage2"]["train_seconds"], abs=0.05)
    assert second.weights_fingerprint == first.weights_fingerprint
    r2 = second.rank(request_for(data, k=3))
    assert second.ctx.notes["calrec"]["catalog_embeddings_cached"] is True
    assert torch.equal(second.item_embeddings, emb)
    assert np.array_equal(r1.items, r2.items)


def test_params_and_specs():
    assert parse_specs("ml-1m, synthetic:seed=1,n_users=50,,amazon:Beauty") == [
        "ml-1m", "synthetic:seed=1,n_users=50", "amazon:Beauty"]
    assert parse_specs("") == []
    cls = get_method("calrec")
    for bad in ({"inference": "sparse"}, {"batch_size": 1}, {"tau": 0}, {"contrastive": "sideways"}):
        with pytest.raises(ConfigError):
            resolve_params("calrec", cls.Params, {"calrec": bad})
    resolve_params("calrec", cls.Params, {"calrec": {"batch_size": 1, "tt_weight": 0, "ut_weight": 0}})
    from benchmark.recipes import resolve_recipe

    cpu = resolve_recipe(cls, "calrec", {}, device_type="cpu").params
    gpu = resolve_recipe(cls, "calrec", {}, device_type="cuda").params
    assert (cpu.max_train_examples, cpu.stage1_max_examples, cpu.valid_users, cpu.n_samples) == (2048, 1024, 256, 8)
    assert (gpu.max_train_examples, gpu.stage1_max_examples, gpu.valid_users, gpu.n_samples) == (None, None, None, 16)
    assert cpu.stage1 == gpu.stage1 == "auto" and not cpu.lora  # both stages, full fine-tuning (the paper)
    with pytest.raises(ConfigError, match="calrec.n_samples"):
        resolve_params("calrec", cls.Params, {"calrec": {"n_samples": "many"}})
