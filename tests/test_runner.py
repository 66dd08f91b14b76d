"""The runner, run store and candidate sets on a small synthetic split."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest

from benchmark.candidates import build_candidates, parse_protocol, target_in_candidates
from benchmark.config import params_key, parse_sets, resolve_params
from benchmark.data.synthetic import tiny_split
from benchmark.errors import ConfigError, MethodError
from benchmark.registry import Method, builtin_methods, get_method
from benchmark.runner import RunOptions, Runner, check_ranking, resolve_method, subsample_users
from benchmark.store import RunStore
from benchmark.types import PAD, CandidateSet, RankedLists, RankRequest


@pytest.fixture(scope="module")
def split():
    return tiny_split(seed=0)


def run(split, tmp_path, methods, **kw):
    opts = RunOptions(methods=methods, dataset=split.dataset, runs_dir=tmp_path / "runs", progress=False, **kw)
    runner = Runner(opts, split)
    return runner, runner.run()


def test_pop_and_random_units_are_written_and_scored(split, tmp_path):
    runner, outcomes = run(split, tmp_path, ["random", "pop"])
    assert [o.label for o in outcomes] == ["random", "pop"]
    for o in outcomes:
        files = {p.name for p in o.path.iterdir()}
        assert files == {"config.json", "metrics.json", "per_user.jsonl", "rankings.jsonl"}
        rows = [json.loads(line) for line in (o.path / "per_user.jsonl").read_text().splitlines()]
        assert len(rows) == len(split.test)
        means = json.loads((o.path / "metrics.json").read_text())["means"]
        assert means["ndcg@10"] == pytest.approx(np.mean([r["ndcg@10"] for r in rows]))
    rand, pop = (o.metrics["means"]["ndcg@10"] for o in outcomes)
    assert pop > rand
    meta = json.loads((runner.store.run_dir(runner.run_id) / "run.json").read_text())
    assert meta["status"] == "finished" and meta["split_fingerprint"] == split.fingerprint
    assert meta["manifest"]["versions"]["torch"]


def test_rankings_exclude_seen_items_and_hold_k_ids(split, tmp_path):
    _, (outcome,) = run(split, tmp_path, ["pop"])
    hist = {int(u): set(h.tolist()) for u, h in zip(split.test.users, split.test.histories)}
    for line in (outcome.path / "rankings.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert len(row["items"]) == 20 == len(set(row["items"]))
        assert not hist[row["uid"]] & set(row["items"])


def test_finished_unit_is_reused_and_force_recomputes(split, tmp_path):
    _, first = run(split, tmp_path, ["pop"])
    _, second = run(split, tmp_path, ["pop"])
    assert not first[0].reused and second[0].reused
    assert (first[0].path / "per_user.jsonl").read_bytes() == (second[0].path / "per_user.jsonl").read_bytes()
    _, third = run(split, tmp_path, ["pop"], force=True)
    assert not third[0].reused


class Boom(Exception):
    pass


@dataclass
class _NoParams:
    pass


class Crashing(Method):
    """Fails in fit, as an interrupted run would."""

    Params = _NoParams

    def fit(self, data):
        raise Boom()


def test_interrupted_run_resumes_with_finished_units_kept(split, tmp_path, monkeypatch):
    import benchmark.runner as runner_mod

    real = runner_mod.get_method

    def fake(name):
        return Crashing if name == "crash" else real(name)

    monkeypatch.setattr(runner_mod, "get_method", fake)
    with pytest.raises(Boom):
        run(split, tmp_path, ["pop", "crash"], run_id="r1")
    store = RunStore(tmp_path / "runs")
    assert (store.unit_dir("r1", "pop", 0) / "metrics.json").is_file()
    assert not store.unit_dir("r1", "crash", 0).exists()  # nothing half-written
    meta = json.loads((store.run_dir("r1") / "run.json").read_text())
    assert (meta["status"], meta["error"]) == ("failed", "Boom")  # never left "running"
    monkeypatch.setattr(runner_mod, "get_method", real)
    _, outcomes = run(split, tmp_path, ["pop", "random"], run_id="r1")
    assert [o.reused for o in outcomes] == [True, False]
    meta = json.loads((store.run_dir("r1") / "run.json").read_text())
    assert meta["status"] == "finished" and "error" not in meta
    assert meta["methods"] == ["pop", "crash", "random"] and set(meta["stages"]) == {"pop/seed-0", "random/seed-0"}


def test_sampled_candidates_contain_target_and_no_seen_items(split, tmp_path):
    cands = build_candidates("sampled:10", split, split.test, seed=0, cache_dir=tmp_path)
    assert cands.items.shape == (len(split.test), 11)
    assert target_in_candidates(cands, split.test.targets).all()
    for row, hist in zip(cands.items, split.test.histories):
        assert len(set(row.tolist())) == 11 and not set(hist.tolist()) & set(row.tolist())
    again = build_candidates("sampled:10", split, split.test, seed=0, cache_dir=tmp_path)
    assert np.array_equal(again.items, cands.items)
    _, (o,) = run(split, tmp_path, ["pop"], candidates="sampled:10")
    assert o.metrics["target_in_candidates"] == 1.0
    assert json.loads((o.path / "config.json").read_text())["protocol"] == "loo-sampled_10"


def test_retrieved_candidates_make_outside_targets_a_miss(split, tmp_path):
    run(split, tmp_path, ["pop"])
    runner, (o,) = run(split, tmp_path, ["random"], candidates="retrieved:pop:5")
    cands = runner.test_candidates
    inside = target_in_candidates(cands, split.test.targets)
    per_user = [json.loads(line) for line in (o.path / "per_user.jsonl").read_text().splitlines()]
    hr20 = np.array([r["hr@20"] for r in per_user])
    assert (hr20[~inside] == 0).all() and (hr20[inside] == 1).all()  # all 5 candidates fit in the top 20
    assert o.metrics["target_in_candidates"] == pytest.approx(inside.mean())


def test_retrieved_without_a_finished_retriever_is_a_clear_error(split, tmp_path):
    with pytest.raises(ConfigError, match="needs a finished pop run"):
        run(split, tmp_path, ["random"], candidates="retrieved:pop:5")


@pytest.mark.parametrize("bad", ["sampled", "sampled:x", "retrieved:pop", "topk:3", "sampled:5:zipf"])
def test_unknown_candidate_protocols_are_rejected(bad):
    with pytest.raises(ConfigError):
        parse_protocol(bad)


def test_eval_user_subsample_is_seeded_and_shared(split, tmp_path):
    a = subsample_users(split.test, 10)
    b = subsample_users(split.test, 10)
    assert np.array_equal(a.users, b.users) and len(a) == 10
    _, outs = run(split, tmp_path, ["pop", "random"], eval_users=10)
    users = [[json.loads(line)["uid"] for line in (o.path / "per_user.jsonl").read_text().splitlines()] for o in outs]
    assert users[0] == users[1] == a.users.tolist()


def _request(split, n=3, k=5):
    users = split.test.users[:n]
    return RankRequest(users, split.test.histories[:n], CandidateSet("full", users), k)


def test_check_ranking_rejects_duplicates_seen_items_and_missing_users(split):
    req = _request(split)
    free = [np.setdiff1d(np.arange(split.n_items), h)[:5] for h in req.histories]
    good = RankedLists(req.users[::-1].copy(), np.stack(free)[::-1].copy())
    fixed = check_ranking(good, req, split.n_items, "m")
    assert np.array_equal(fixed.users, req.users) and np.array_equal(fixed.items, np.stack(free))
    dup = np.stack(free)
    dup[0, 1] = dup[0, 0]
    with pytest.raises(MethodError, match="twice"):
        check_ranking(RankedLists(req.users, dup), req, split.n_items, "m")
    seen = np.stack(free)
    seen[1, 0] = req.histories[1][0]
    with pytest.raises(MethodError, match="seen"):
        check_ranking(RankedLists(req.users, seen), req, split.n_items, "m")
    with pytest.raises(MethodError, match="ranked 2 users"):
        check_ranking(RankedLists(req.users[:2], np.stack(free)[:2]), req, split.n_items, "m")
    with pytest.raises(MethodError, match="fewer than k=5"):  # the catalog allows k items
        check_ranking(RankedLists(req.users, np.stack(free)[:, :2]), req, split.n_items, "m")
    gap = np.stack(free)
    gap[0, 0] = PAD  # an empty position before real items would shift every item down a rank
    with pytest.raises(MethodError, match="empty"):
        check_ranking(RankedLists(req.users, gap), req, split.n_items, "m")


def test_a_list_may_be_shorter_than_k_only_when_the_candidates_are(split):
    req = _request(split)
    allowed = [np.setdiff1d(np.arange(split.n_items), h)[:3] for h in req.histories]
    cands = CandidateSet("sampled:3", req.users, np.stack(allowed))
    short_req = RankRequest(req.users, req.histories, cands, k=5)
    out = check_ranking(RankedLists(req.users, np.stack(allowed)), short_req, split.n_items, "m")
    assert (out.items[:, 3:] == PAD).all() and (out.items[:, :3] != PAD).all()


def test_overrides_are_typed_and_unknown_fields_listed():
    cls = get_method("examples.markov_plugin:Markov")
    params = resolve_params("markov", cls.Params, parse_sets(["markov.pop_weight=0.5"]))
    assert params.pop_weight == 0.5
    with pytest.raises(ConfigError, match="pop_weight"):
        resolve_params("markov", cls.Params, parse_sets(["markov.nope=1"]))
    with pytest.raises(ConfigError):
        resolve_params("markov", cls.Params, parse_sets(["markov.pop_weight=abc"]))
    with pytest.raises(ConfigError, match="METHOD.FIELD=VALUE"):
        parse_sets(["pop_weight=1"])


def test_set_values_are_parsed_against_each_fields_type():
    @dataclasses.dataclass
    class P:
        mode: str = "loss"
        name: str = "x"
        model: str | None = "m"
        width: int = 1
        rate: float = 0.1
        flag: bool = False
        blocks: list = dataclasses.field(default_factory=list)

    sets = parse_sets(["p.mode=none", "p.name=128", "p.model=none", "p.width=128", "p.rate=1e-3",
                       "p.flag=true", "p.blocks=[1, 2]"])
    params = resolve_params("p", P, sets)
    assert params.mode == "none"  # a str field keeps the word (it used to become "None")
    assert params.name == "128"
    assert params.model is None  # an optional field reads none as None
    assert (params.width, params.rate, params.flag, params.blocks) == (128, 1e-3, True, [1, 2])
    assert resolve_params("p", P, parse_sets(["p.model=null"])).model is None
    assert resolve_params("p", P, parse_sets(["p.model=hub/id"])).model == "hub/id"
    with pytest.raises(ConfigError, match="integer"):
        resolve_params("p", P, parse_sets(["p.width=1.5"]))


def test_params_key_leaves_out_later_fields_only_at_their_default():
    @dataclasses.dataclass
    class P:
        ADDED_LATER = {"block": "preln"}
        hidden: int = 64
        block: str = "preln"

    assert params_key(P()) == {"hidden": 64}  # the key a cache written before `block` existed used
    assert params_key(P(block="pmixer")) == {"hidden": 64, "block": "pmixer"}
    assert params_key(P(hidden=32)) == {"hidden": 32}


def test_params_key_compares_later_fields_with_their_legacy_value_not_a_subclass_default():
    """A preset subclass that changes a later field's default must not share keys with the base class."""

    @dataclasses.dataclass
    class P:
        ADDED_LATER = {"block": "preln"}
        hidden: int = 64
        block: str = "preln"

    @dataclasses.dataclass
    class Preset(P):
        block: str = "pmixer"

    assert params_key(Preset()) == {"hidden": 64, "block": "pmixer"} == params_key(P(block="pmixer"))
    assert params_key(Preset(block="preln")) == params_key(P()) == {"hidden": 64}


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: .*pop.*random"):
        get_method("nosuch")
    with pytest.raises(ConfigError, match="cannot import"):
        get_method("no_such_module_xyz:Thing")


def test_plugin_method_beats_pop_on_planted_sequences(tmp_path):
    bigger = tiny_split(seed=0, n_users=200, n_items=100)
    _, outs = run(bigger, tmp_path, ["examples.markov_plugin:Markov", "pop"])
    markov, pop = (o.metrics["means"]["ndcg@10"] for o in outs)
    assert outs[0].label == "markov"
    assert markov > 1.5 * pop  # measured 0.438 vs 0.232


def test_model_loaded_from_the_fit_cache_reports_the_cached_training_time(split, tmp_path):
    tiny = {"sasrec": {"hidden": 8, "blocks": 1, "max_len": 10, "epochs": 2, "batch_size": 16}}
    _, (first,) = run(split, tmp_path, ["sasrec"], overrides=tiny)
    assert first.metrics["train_cached"] is False
    assert first.metrics["train_time_s"] == first.metrics["fit_wall_s"]
    _, (again,) = run(split, tmp_path, ["sasrec"], overrides=tiny, eval_users=5)  # another unit, same fit
    notes = first.metrics["info"]["sasrec"]
    assert again.metrics["info"]["sasrec"]["loaded_from"]
    assert again.metrics["train_cached"] is True
    assert again.metrics["train_time_s"] == pytest.approx(notes["train_seconds"], abs=1e-3)


class ResumedFit(Method):
    """Reports, as a resumed LLM fit does, training that earlier attempts put into its checkpoint."""

    Params = _NoParams

    def fit(self, data):
        self.n_items = data.n_items
        self.ctx.notes["resumed"] = {"train_seconds": 130.0, "prior_train_seconds": 120.0}

    def rank(self, request):
        import torch

        from benchmark.ranking import rank_by_scores

        return rank_by_scores(request, self.n_items, lambda users, histories: torch.zeros(len(users), self.n_items))


def test_a_resumed_fit_reports_the_training_time_of_every_attempt(split, tmp_path, monkeypatch):
    import benchmark.runner as runner_mod

    real = runner_mod.get_method
    monkeypatch.setattr(runner_mod, "get_method", lambda name: ResumedFit if name == "resumed" else real(name))
    _, (o,) = run(split, tmp_path, ["resumed"])
    m = o.metrics
    assert m["train_resumed_s"] == 120.0 and m["train_cached"] is False
    assert m["train_time_s"] == pytest.approx(m["fit_wall_s"] + 120.0, abs=1e-3)
    _, (plain,) = run(split, tmp_path, ["pop"])
    assert plain.metrics["train_resumed_s"] == 0.0 and plain.metrics["train_time_s"] == plain.metrics["fit_wall_s"]


def test_label_alias_runs_one_method_twice_with_separate_overrides(split, tmp_path):
    overrides = {"rand_b": {}}  # the label, not the method, takes --set values
    _, outcomes = run(split, tmp_path, ["random", "rand_b=random"], overrides=overrides)
    assert [o.label for o in outcomes] == ["random", "rand_b"]
    config = json.loads((outcomes[1].path / "config.json").read_text())
    assert config["label"] == "rand_b" and config["method"].endswith("RandomRec")
    with pytest.raises(ConfigError, match="LABEL=METHOD"):
        resolve_method("bad label=random", {})
    with pytest.raises(ConfigError, match="unknown method"):
        resolve_method("x=nosuchmethod", {})


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("llamarec", {"llamarec": {"retriever": "nosuch"}}, "unknown method 'nosuch'"),
        ("llamarec", {"llamarec": {"retriever": "sft"}}, "LLM method"),
        ("p2rec", {"p2rec": {"downstream": "nosuch"}}, "unknown method 'nosuch'"),
        ("calrec", {"calrec": {"stage1": "ml-1m,nosuchdata"}}, "unknown dataset 'nosuchdata'"),
    ],
)
def test_settings_naming_missing_methods_or_datasets_fail_before_any_work(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_method(name, overrides)


def test_every_shipped_method_resolves_with_its_own_defaults():
    # `run --methods NAME` with no --set must pass every check a method makes on its settings
    # (calrec's default stage1="auto" once reached the dataset check as a dataset name)
    for name in builtin_methods():
        resolved = resolve_method(name, {})
        assert resolved.label == name


def test_the_manifest_names_the_cpu_model_and_its_native_bf16_units():
    """Figures must name the CPU: bf16 results and speeds differ between AMX, AVX512-BF16 and none
    (this repository's sessions ran on an AMD EPYC with AVX512-BF16 and on an Intel Xeon with AMX)."""
    from benchmark.manifest import cpu_description, device_name

    amx = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
           "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
           "processor\t: 1\nmodel name\t: another\n")
    text = cpu_description(amx)
    assert text.startswith("Intel(R) Xeon(R) Platinum 8480+, family 6 model 143 (")
    assert text.endswith("cores; bf16: amx_bf16, avx512_bf16)")
    avx2 = "processor\t: 0\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx2 fma\n"
    assert cpu_description(avx2).endswith("cores; no native bf16)") and "AMD EPYC 7B12" in cpu_description(avx2)
    assert cpu_description("").endswith("flags unknown)")  # unreadable: says so rather than guessing
    assert device_name("cpu") == cpu_description()
