"""LlamaRec: verbalizer tokens and scoring, permutation bookkeeping, two-stage reporting.

A tiny random Llama with the SmolLM2 tokenizer stands in for the LLM; a stub retriever
(items by a fixed order) stands in for SASRec so the tests take seconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines.llamarec as llamarec_module
from benchmark.data.synthetic import tiny_split
from benchmark.errors import ConfigError
from benchmark.llm.loading import LLM, tiny_llm
from benchmark.llm.verbalizer import index_labels, label_token_ids, verbalizer_scores
from benchmark.ranking import rank_by_scores
from benchmark.registry import Method, register_method
from benchmark.runner import RunOptions, Runner


@dataclass
class StubParams:
    reverse: bool = False


@register_method("stub_retriever")
class StubRetriever(Method):
    """Ranks unseen items by id (or reversed): a deterministic first stage."""

    Params = StubParams

    def fit(self, data):
        self.n_items = data.n_items

    def rank(self, request):
        sign = 1.0 if self.params.reverse else -1.0
        ranked = rank_by_scores(
            request, self.n_items,
            lambda users, hist: sign * torch.arange(self.n_items, dtype=torch.float32).expand(len(users), -1),
        )
        ranked.info["method"] = "stub_retriever"
        return ranked


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return tiny_llm(hidden=32, layers=2)


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llm")
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def split():
    return tiny_split(seed=0, n_users=24, n_items=40)


def test_index_letters_are_single_distinct_tokens_for_smollm2(tiny):
    ids = label_token_ids(tiny, index_labels(20))
    assert len(ids) == 20 and len(set(ids)) == 20
    for letter, tid in zip(index_labels(20), ids):
        assert tiny.tokenizer.decode([tid]) == letter


class _SplittingTokenizer:
    """Tokenizes "Q" into two tokens, like a vocabulary without a single-letter Q."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1, 2] if t == "Q" else [ord(t)] for t in texts]}


def test_multi_token_index_label_is_a_clear_error():
    fake = LLM(None, _SplittingTokenizer(), "fake", "", torch.device("cpu"), torch.float32, 0, 0)
    with pytest.raises(ConfigError, match=r"one token.*'Q'"):
        label_token_ids(fake, index_labels(20))
    with pytest.raises(ConfigError, match="A-Z"):
        index_labels(27)


def test_verbalizer_scores_equal_the_full_forward_and_ignore_padding(tiny):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 500, size=n).tolist() for n in (7, 3, 12)]
    letters = label_token_ids(tiny, index_labels(5))
    batched = verbalizer_scores(tiny.model, prompts, letters, pad_id=tiny.pad_id, batch_size=3)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = tiny.model(input_ids=torch.tensor([prompt])).logits[0, -1]
        np.testing.assert_allclose(batched[row], logits[letters].double().numpy(), rtol=1e-4, atol=1e-4)


def _fake_scorer(values: dict[str, float]):
    """A stand-in for the LLM: each letter scores the value of the title listed under it."""

    def score(model, prompts, token_ids, *, pad_id, batch_size=8, progress=False, precision="fp32"):
        out = []
        for prompt, ids in zip(prompts, token_ids):
            text = _TOKENIZER.decode(prompt)
            pool = text.split("Candidate pool:")[1]
            titles = re.findall(r"\(([A-Z])\) (.*?)(?= \n |<\|im_end\|>|$)", pool)
            out.append([values[t] for _, t in titles] + [0.0] * (len(ids) - len(titles)))
        return np.asarray(out, dtype=np.float64)

    return score


_TOKENIZER = None


def _ranker(model_dir, tmp_path, split, **params):
    cls = llamarec_module.LlamaRec
    from benchmark.config import resolve_params
    from benchmark.registry import RunContext

    p = resolve_params("llamarec", cls.Params, {"llamarec": {
        "llm": str(model_dir), "retriever": "stub_retriever", "k": 6, "max_train_examples": 4, "batch_size": 4,
        "eval_batch_size": 4, **params}})
    retriever = StubRetriever(StubParams(), None)
    retriever.fit(split.train_data())
    ctx = RunContext(seed=0, device="cpu", work_dir=tmp_path / "work", validate=lambda r: {"ndcg@10": 0.0},
                     method_loader=lambda name: retriever, progress=False)
    method = cls(p, ctx)
    method.fit(split.train_data())
    return method


def test_permuting_candidates_permutes_scores_and_nothing_else(model_dir, tmp_path, split, monkeypatch):
    global _TOKENIZER
    method = _ranker(model_dir, tmp_path, split)
    _TOKENIZER = method.llm.tokenizer
    values = {t: float(i % 7) + 0.01 * i for i, t in enumerate(method.texts)}
    monkeypatch.setattr(llamarec_module, "verbalizer_scores", _fake_scorer(values))
    histories = [split.test.histories[r] for r in range(4)]
    top = np.stack([np.setdiff1d(np.arange(split.n_items), h)[:6] for h in histories])
    items, scores = method._rerank(None, histories, top, progress=False)
    perm = np.random.default_rng(1).permutation(6)
    items_p, scores_p = method._rerank(None, histories, top[:, perm], progress=False)
    expected = np.array([[values[method.texts[i]] for i in row] for row in items])
    np.testing.assert_array_equal(scores, expected)  # each score is its own item's value
    np.testing.assert_array_equal(np.sort(scores, axis=1)[:, ::-1], scores)  # ranked by score
    np.testing.assert_array_equal(items, items_p)  # the order presented does not change the result
    np.testing.assert_array_equal(scores, scores_p)


def test_two_stage_run_reports_hits_and_outside_targets_are_misses(model_dir, tmp_path, split):
    overrides = {"llamarec": {"llm": str(model_dir), "retriever": "stub_retriever", "k": 5, "max_train_examples": 6,
                              "batch_size": 3, "eval_batch_size": 4, "num_threads": 1}}
    opts = RunOptions(methods=["stub_retriever", "llamarec"], dataset=split.dataset, runs_dir=tmp_path / "runs",
                      progress=False, overrides=overrides, k=20)
    outcomes = Runner(opts, split).run()
    llama = next(o for o in outcomes if o.label == "llamarec")
    stub = next(o for o in outcomes if o.label == "stub_retriever")
    report = llama.metrics["two_stage"]
    rankings = [json.loads(line) for line in (llama.path / "rankings.jsonl").read_text().splitlines()]
    per_user = [json.loads(line) for line in (llama.path / "per_user.jsonl").read_text().splitlines()]
    stub_rank = {r["uid"]: r["items"] for r in
                 (json.loads(line) for line in (stub.path / "rankings.jsonl").read_text().splitlines())}
    hits = np.array([r["target"] in stub_rank[r["uid"]][:5] for r in rankings])
    assert report["retrieval_hit_rate"] == pytest.approx(hits.mean())
    assert report["first_stage_means"]["ndcg@10"] == pytest.approx(stub.metrics["means"]["ndcg@10"])
    for rank_row, user_row, hit in zip(rankings, per_user, hits):
        # the reranked 5 are the retriever's 5; the tail is the retriever's order
        assert set(rank_row["items"][:5]) == set(stub_rank[rank_row["uid"]][:5])
        assert rank_row["items"][5:] == stub_rank[rank_row["uid"]][5:20]
        assert user_row["in_first_stage"] == float(hit)
        if not hit:  # a target outside the reranked 5 is a miss in every metric up to 5
            within = [m for m in user_row if re.fullmatch(r"(hr|ndcg|mrr|recall)@[15]", m)]
            assert len(within) == 8 and all(user_row[m] == 0.0 for m in within)
    assert llama.metrics["info"]["llamarec"]["retriever"] == "stub_retriever"


def test_training_examples_hold_the_target_once_and_label_its_letter(model_dir, tmp_path, split):
    method = _ranker(model_dir, tmp_path, split)
    examples = method.training_examples(split.train_data(), cap=5)
    tok = method.llm.tokenizer
    for ids, labels in examples:
        labelled = [int(t) for t in labels if t != -100]
        assert labelled[-1] == method.llm.eos_id and len(labelled) == 2
        letter = tok.decode([labelled[0]])
        pool = tok.decode([int(t) for t in ids]).split("Candidate pool:")[1]
        assert f"({letter}) " in pool
        assert len(re.findall(r"\([A-Z]\) ", pool)) == 6


def test_prompts_are_tokenized_in_chunks_with_the_same_ids(model_dir, tmp_path, split, monkeypatch):
    """Training prompts are tokenized a chunk at a time (ML-1M's 981k prompts at once would
    take tens of GiB as Python lists); the ids are those of one call over every prompt."""
    import baselines.llamarec as llamarec_mod

    method = _ranker(model_dir, tmp_path, split)
    whole = method.training_examples(split.train_data(), cap=7)
    calls = []
    tokenizer = method.llm.tokenizer
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, texts, **kw: calls.append(len(texts)) or real(
        self, texts, **kw))
    monkeypatch.setattr(llamarec_mod, "ENCODE_CHUNK", 3)
    chunked = method.training_examples(split.train_data(), cap=7)
    assert calls == [3, 3, 1]
    assert len(chunked) == len(whole) == 7
    for (ids_a, lab_a), (ids_b, lab_b) in zip(chunked, whole):
        assert ids_a.dtype == np.int32 and np.array_equal(ids_a, ids_b) and np.array_equal(lab_a, lab_b)


def test_validation_reranks_only_users_whose_target_was_retrieved(model_dir, tmp_path, split):
    seen = []

    def validate(ranked):
        seen.append(ranked)
        return {"ndcg@10": 0.5}

    from benchmark.config import resolve_params
    from benchmark.registry import RunContext

    cls = llamarec_module.LlamaRec
    p = resolve_params("llamarec", cls.Params, {"llamarec": {
        "llm": str(model_dir), "retriever": "stub_retriever", "k": 8, "max_train_examples": 8, "batch_size": 2,
        "eval_every": 2, "valid_users": 3, "eval_batch_size": 4}})
    retriever = StubRetriever(StubParams(), None)
    data = split.train_data()
    retriever.fit(data)
    ctx = RunContext(seed=0, device="cpu", work_dir=tmp_path / "w", validate=validate,
                     method_loader=lambda name: retriever, progress=False)
    method = cls(p, ctx)
    method.fit(data)
    assert seen, "validation never ran"
    targets = dict(zip(data.valid.users.tolist(), data.valid.targets.tolist()))
    for ranked in seen:
        assert len(ranked.users) <= 3
        for u, row in zip(ranked.users, ranked.items):
            assert targets[int(u)] in row.tolist()
    assert method.ctx.notes["llamarec"]["best_valid_ndcg@10"] == 0.5


def test_budgets_resolve_by_device_and_name_the_method_in_errors():
    from benchmark.config import resolve_params
    from benchmark.recipes import resolve_recipe

    cls = llamarec_module.LlamaRec
    cpu = resolve_recipe(cls, "llamarec", {}, device_type="cpu")
    gpu = resolve_recipe(cls, "llamarec", {}, device_type="cuda")
    assert (cpu.params.max_train_examples, cpu.params.history_len, cpu.params.eval_every) == (1024, 20, 100)
    assert (gpu.params.max_train_examples, gpu.params.history_len, gpu.params.eval_every) == (None, 20, 100)
    assert (gpu.params.batch_size, gpu.params.warmup_steps, gpu.params.patience) == (16, 100, 20)
    assert cpu.budget == "cpu" and gpu.budget == "reference"
    # the retriever and 4-bit loading depart on every device, and say so
    assert {d.field for d in gpu.departures} >= {"retriever", "quantize", "llm"}
    with pytest.raises(ConfigError, match=r"llamarec\.max_train_examples='x'"):
        resolve_params("llamarec", cls.Params, {"llamarec": {"max_train_examples": "x"}})
    with pytest.raises(ConfigError, match="test_order"):
        resolve_params("llamarec", cls.Params, {"llamarec": {"test_order": "random"}})
