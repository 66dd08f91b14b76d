"""Recipes and budgets: every default has a source, departures are named, comparisons change one thing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

import benchmark.recipes as recipes
from benchmark.config import parse_sets
from benchmark.data.synthetic import tiny_split
from benchmark.errors import ConfigError, MethodError
from benchmark.hparams import field_meta, hp
from benchmark.ranking import rank_by_scores
from benchmark.recipes import Budget, render_markdown, resolve_recipe
from benchmark.registry import Method, builtin_methods, get_method, register_method
from benchmark.runner import RunOptions, Runner
from benchmark.types import PAD, CandidateSet, RankedLists, RankRequest

ROOT = Path(__file__).resolve().parent.parent


def test_every_result_shaping_default_of_every_method_names_its_source():
    missing = []
    for name, cls in builtin_methods().items():
        for f in dataclasses.fields(cls.Params):
            meta = field_meta(f)
            if meta.get("role", "train") != "harness" and not meta.get("source") and f.name != "max_train_seconds":
                missing.append(f"{name}.{f.name}")
    assert not missing, f"declare a source (hp(..., source=...)) or role='harness' for: {missing}"


def test_the_committed_recipe_table_is_the_generated_one():
    committed = (ROOT / "baselines" / "RECIPES.md").read_text()
    assert committed == render_markdown(builtin_methods()), "regenerate: python -m benchmark recipes --markdown"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cft_and_sft_differ_only_in_cfts_own_fields(device):
    cft, sft = get_method("cft"), get_method("sft")
    a = resolve_recipe(cft, "cft", {}, device_type=device)
    b = resolve_recipe(sft, "sft", {}, device_type=device)
    own = set(cft.Params.OWN_FIELDS)
    assert set(dataclasses.asdict(a.params)) - set(dataclasses.asdict(b.params)) == own
    assert {k: v for k, v in dataclasses.asdict(a.params).items() if k not in own} == dataclasses.asdict(b.params)
    assert a.budget == b.budget and [d.text() for d in a.departures] == [d.text() for d in b.departures]
    assert a.params.alpha == 0.1 and a.params.beta == 0.25 and a.params.weighting == "linear"


def test_reference_recipes_of_the_generative_methods():
    sft = resolve_recipe(get_method("sft"), "sft", {}, device_type="cuda").params
    assert (sft.lora, sft.lr, sft.batch_size * sft.grad_accum, sft.epochs, sft.patience) == (False, 1e-4, 64, 3, 1)
    assert (sft.num_beams, sft.grounding, sft.l2_merge, sft.embed_model) == (5, "l2", "round_robin", "tuned")
    big = resolve_recipe(get_method("bigrec"), "bigrec", {}, device_type="cuda").params
    assert (big.lora, big.lora_r, big.lora_alpha, big.lora_targets) == (True, 8, 16, "q_proj,v_proj")
    assert (big.lr, big.batch_size * big.grad_accum, big.epochs, big.patience) == (1e-4, 128, 50, 5)
    assert (big.max_train_examples, big.history_len, big.min_history, big.train_on_inputs) == (1024, 10, 10, True)
    assert (big.num_beams, big.l2_merge, big.embed_model) == (4, "top_beam", "base")


def test_a_cpu_budget_and_a_set_override_are_named_departures(monkeypatch):
    monkeypatch.setattr(recipes, "native_bf16", lambda device: True)
    cpu = resolve_recipe(get_method("sft"), "sft", parse_sets(["sft.num_beams=10"]), device_type="cpu")
    why = {d.field: d.why for d in cpu.departures}
    assert why["max_train_examples"] == "budget cpu" and why["epochs"] == "budget cpu"
    assert why["num_beams"] == "--set/--config" and why["llm"] == "not available here"
    assert "precision" not in why
    assert "max_train_examples=2048 instead of all (budget cpu)" in cpu.note()
    ref = resolve_recipe(get_method("sft"), "sft", {}, device_type="cpu", budget="reference")
    assert [d.field for d in ref.departures] == ["llm"]  # only the backbone departs


def test_no_native_bf16_turns_precision_to_fp32_and_says_so(monkeypatch):
    monkeypatch.setattr(recipes, "native_bf16", lambda device: False)
    r = resolve_recipe(get_method("cft"), "cft", {}, device_type="cpu")
    assert r.params.precision == "fp32"
    (dep,) = [d for d in r.departures if d.field == "precision"]
    assert dep.why == "hardware" and "no native bf16" in dep.detail
    assert recipes.cpu_has_bf16("flags\t: fpu avx2 avx512_bf16 sse") and not recipes.cpu_has_bf16("flags : avx2")


def test_budget_names_are_checked():
    with pytest.raises(ConfigError, match="no budget 'tiny'"):
        resolve_recipe(get_method("sft"), "sft", parse_sets(["sft.budget=tiny"]))
    # a run-wide budget leaves methods without budgets on their recipe
    assert resolve_recipe(get_method("pop"), "pop", {}, budget="cpu").budget == "reference"


def test_bigrec_training_windows_hold_exactly_ten_history_items():
    from baselines.bigrec import BIGRec
    from benchmark.registry import RunContext

    split = tiny_split(seed=3, n_users=30, n_items=40)
    lengths = [len(s) for s in split.train]
    assert min(lengths) < 11 < max(lengths)  # some users too short for a window, some long
    params = resolve_recipe(BIGRec, "bigrec", {}, device_type="cuda").params
    ctx = RunContext(seed=0, device="cpu", work_dir=Path("."), validate=lambda r: {})
    pairs = BIGRec(params, ctx)._pairs(split.train_data(), cap=None)
    assert pairs and all(t >= 10 for _, t in pairs)  # the target has 10 items before it
    expected = sum(max(0, n - 10) for n in lengths)
    assert len(pairs) == expected
    sft_pairs = get_method("sft")(resolve_recipe(get_method("sft"), "sft", {}, device_type="cuda").params,
                                  ctx)._pairs(split.train_data(), cap=None)
    assert len(sft_pairs) == sum(n - 1 for n in lengths)  # CFT/D3: every position, up to 10 items


# -- non-finite scores ---------------------------------------------------------------------------


def _request(n_items: int = 6) -> RankRequest:
    users = np.array([0, 1])
    return RankRequest(users, [np.array([0]), np.array([1])], CandidateSet("full", users), k=3)


def test_nan_scores_are_a_clear_error_and_inf_ranks_first_never_a_leading_pad():
    req = _request()
    nan = torch.zeros((2, 6))
    nan[0, 3] = float("nan")
    with pytest.raises(MethodError, match="NaN"):
        rank_by_scores(req, 6, lambda u, h: nan)
    inf = torch.arange(6, dtype=torch.float32).repeat(2, 1)
    inf[0, 2] = float("inf")
    inf[1, 4] = float("-inf")  # -inf: not rankable, like a masked item: it sorts last
    out = rank_by_scores(req, 6, lambda u, h: inf)
    assert out.items[0].tolist() == [2, 5, 4] and out.items[1].tolist() == [5, 3, 2]
    assert (out.items != PAD).all()


@register_method("_nan_method")
class _NaNMethod(Method):
    """Scores everything NaN."""

    @dataclass
    class Params:
        pass

    def fit(self, data):
        self.n = data.n_items

    def rank(self, request):
        return rank_by_scores(request, self.n, lambda u, h: torch.full((len(u), self.n), float("nan")))


def test_a_method_returning_nan_fails_with_its_name_and_writes_no_unit(tmp_path):
    split = tiny_split(seed=1)
    runner = Runner(RunOptions(methods=["_nan_method"], runs_dir=tmp_path, progress=False), split)
    with pytest.raises(MethodError, match="_nan_method.*NaN"):
        runner.run()
    assert not list(tmp_path.glob("*/_nan_method/seed-0/metrics.json"))


# -- keys: budget and device -----------------------------------------------------------------------


@register_method("_budgeted")
class _Budgeted(Method):
    """Popularity with a budget that caps how much history it counts."""

    @dataclass
    class Params:
        history: int = hp(0, ge=0, source="test recipe: count every training interaction (0)")

    BUDGETS: ClassVar[dict[str, Budget]] = {"cpu": Budget("test budget", {"history": 2})}

    def fit(self, data):
        counts = np.zeros(data.n_items)
        for seq in data.train:
            seq = seq[-self.params.history:] if self.params.history else seq
            np.add.at(counts, seq, 1.0)
        self.scores = torch.from_numpy(counts)

    def rank(self, request):
        return rank_by_scores(request, len(self.scores), lambda u, h: self.scores.expand(len(u), -1))


def test_another_device_or_budget_never_reuses_a_finished_unit(tmp_path, monkeypatch):
    split = tiny_split(seed=2)

    def run(budget: str, device: str = "cpu"):
        import benchmark.runner as runner_mod

        monkeypatch.setattr(runner_mod, "resolve_device", lambda d: device)
        monkeypatch.setattr(runner_mod, "peak_memory_mb", lambda d: {})
        monkeypatch.setattr(runner_mod, "manifest", lambda d, **kw: {"device": d})
        opts = RunOptions(methods=["_budgeted"], runs_dir=tmp_path, budget=budget, progress=False)
        (outcome,) = Runner(opts, split).run()
        return outcome

    first = run("auto")
    assert not first.reused and first.metrics["info"]["recipe_note"].startswith("_budgeted: recipe v1, budget cpu")
    assert run("auto").reused  # the same command reuses it
    reference = run("reference")
    assert not reference.reused  # another budget: recomputed
    gpu = run("reference", device="cuda")
    assert not gpu.reused  # another device kind: recomputed, even with the same settings
    configs = sorted(p.read_text() for p in tmp_path.glob("*/_budgeted/seed-0/config.json"))
    assert any('"budget": "cpu"' in c for c in configs) and any('"device": "cuda"' in c for c in configs)
