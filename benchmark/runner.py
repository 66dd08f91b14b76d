"""The run: split -> candidates -> each method (fit, rank) -> per-user metrics -> run store.

Test targets are read here once, by the scorer, after a method has returned its ranking.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.candidates import Retrieved, build_candidates, parse_protocol, target_in_candidates
from benchmark.config import key_params, params_dict
from benchmark.data.assets import sha256_file
from benchmark.errors import ConfigError, MethodError
from benchmark import parallel
from benchmark.hparams import fields_with_role
from benchmark.manifest import manifest, peak_memory_mb, reset_peak_memory, resolve_device
from benchmark.recipes import Resolved, resolve_recipe
from benchmark.registry import RunContext, get_method
from benchmark.scoring.metrics import coverage, per_user_metrics
from benchmark.store import RunStore, UnitFiles, unit_key
from benchmark.types import PAD, EvalSet, RankedLists, RankRequest, Split
from benchmark.validate import check_label_settings, check_run_target, effective_eval_users, merge_run_meta

CUTOFFS = (1, 5, 10, 20)
EVAL_USER_SEED = 0  # the test-user subsample (--eval-users) is the same for every method and seed


@dataclass
class RunOptions:
    methods: list[str]
    dataset: str = "ml-100k"
    data_dir: Path | None = None
    split: str = "loo"
    candidates: str = "full"
    kcore: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_users: int | None = None
    k: int = 20
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    llm: str | None = None
    device: str = "auto"
    budget: str = "auto"  # "auto" (the device's default budget), "reference", or a budget name
    force: bool = False
    run_id: str | None = None
    runs_dir: Path = Path("runs")
    progress: bool = True

    @property
    def protocol_label(self) -> str:
        """Names the leaderboard: split, candidates and any test-user subsample."""
        label = f"{self.split}-{self.candidates.replace(':', '_')}"
        return f"{label}-u{self.eval_users}" if self.eval_users else label


@dataclass
class UnitOutcome:
    label: str
    seed: int
    path: Path
    metrics: dict
    reused: bool


def torch_device_type(device: str) -> str:
    """"cuda:1" -> "cuda": the kind of device, which shapes results; the index does not."""
    return str(device).split(":", 1)[0]


def subsample_users(evalset: EvalSet, n: int | None) -> EvalSet:
    """A seeded subset of n users (sorted), shared by every method; all users when n is None."""
    if n is None or n >= len(evalset):
        return evalset
    if n <= 0:
        raise ConfigError("--eval-users must be a positive number of test users")
    rows = np.sort(np.random.default_rng(EVAL_USER_SEED).choice(len(evalset), size=n, replace=False))
    return EvalSet(evalset.users[rows], evalset.targets[rows], [evalset.histories[i] for i in rows])


def check_ranking(ranked: RankedLists, request: RankRequest, n_items: int, label: str) -> RankedLists:
    """Reorder to the request's users and reject duplicates, unknown ids, seen or non-candidate items."""
    users = np.asarray(ranked.users, dtype=np.int64)
    if len(users) != len(request.users) or set(users.tolist()) != set(request.users.tolist()):
        raise MethodError(f"method {label} ranked {len(users)} users, expected the {len(request.users)} requested")
    order = {int(u): i for i, u in enumerate(users)}
    rows = np.array([order[int(u)] for u in request.users])
    items = np.asarray(ranked.items, dtype=np.int64)[rows]
    if items.ndim != 2 or items.shape[1] > request.k:
        raise MethodError(f"method {label} returned lists of shape {items.shape}; expected at most k={request.k} columns")
    if items.shape[1] < request.k:
        items = np.pad(items, ((0, 0), (0, request.k - items.shape[1])), constant_values=PAD)
    if ((items < PAD) | (items >= n_items)).any():
        raise MethodError(f"method {label} returned item ids outside the catalog (0..{n_items - 1})")
    cands = request.candidates
    for row in range(len(items)):
        real = items[row] != PAD
        user = int(request.users[row])
        if real.any() and not real[: int(real.sum())].all():
            raise MethodError(f"method {label} left an empty (PAD) position before a ranked item for user {user}; "
                              "a list must hold its items first, best first")
        got = items[row][real]
        if len(np.unique(got)) != len(got):
            raise MethodError(f"method {label} ranked an item twice for user {user}")
        if cands.exclude_seen and np.isin(got, request.histories[row]).any():
            raise MethodError(f"method {label} ranked an already seen item for user {user}")
        if cands.items is not None and not np.isin(got, cands.items[row]).all():
            raise MethodError(f"method {label} ranked an item outside the {cands.protocol} candidates")
        if len(got) < request.k and len(got) < allowed_count(request, row, n_items):
            raise MethodError(
                f"method {label} ranked {len(got)} items for user {user}, fewer than k={request.k} although "
                f"{allowed_count(request, row, n_items)} candidates were allowed; return k items (or fill them)")
    scores = None if ranked.scores is None else np.asarray(ranked.scores, dtype=np.float64)[rows]
    if scores is not None and np.isnan(scores[items != PAD]).any():
        raise MethodError(f"method {label} returned NaN scores for ranked items; its model diverged or is broken")
    extras = {name: np.asarray(v)[rows] for name, v in ranked.extras.items()}
    return RankedLists(request.users.copy(), items, scores, extras, dict(ranked.info), ranked.first_stage)


def allowed_count(request: RankRequest, row: int, n_items: int) -> int:
    """How many items the candidate set lets this user's list hold."""
    cands = request.candidates
    pool = np.arange(n_items) if cands.items is None else np.unique(cands.items[row][cands.items[row] != PAD])
    if cands.exclude_seen:
        pool = np.setdiff1d(pool, request.histories[row])
    return int(len(pool))


def merge_memory(per_process: list[dict[str, float]]) -> dict[str, Any]:
    """One unit's peak memory: the largest over processes, and each process's when there are several."""
    out: dict[str, Any] = {name: max(m[name] for m in per_process) for name in per_process[0]}
    if len(per_process) > 1:
        out["per_process"] = per_process
    return out


def _written_at(unit: UnitFiles) -> int:
    return (unit.path / "metrics.json").stat().st_mtime_ns


def _cached_train_seconds(notes: dict[str, Any]) -> float | None:
    """Training seconds of a fit loaded from the model cache (a notes entry with loaded_from), else None."""
    for value in notes.values():
        if isinstance(value, dict) and value.get("loaded_from") and value.get("train_seconds") is not None:
            return float(value["train_seconds"])
    return None


def _resumed_train_seconds(notes: dict[str, Any]) -> float:
    """Training seconds that earlier, interrupted attempts put into the checkpoints this fit resumed
    from (the `prior_train_seconds` of each notes entry): fit() in this process timed only the rest."""
    return float(sum(float(v.get("prior_train_seconds") or 0.0) for v in notes.values() if isinstance(v, dict)))


def method_label(name: str) -> str:
    """The label a --methods entry is stored under (`LABEL=METHOD`, a name, or `module:Class`)."""
    label, sep, _ = name.partition("=")
    if sep:
        return label.strip()
    return get_method(name).name if ":" in name else name


def resolve_method(
    name: str,
    overrides: dict[str, dict[str, Any]],
    *,
    device_type: str = "cpu",
    budget: str = "auto",
    llm: str | None = None,
) -> Resolved:
    """The method class, its label, its resolved hyperparameters and its departures from the
    recipe (raises on bad input). See `benchmark.recipes` for the layering.

    `LABEL=METHOD` runs METHOD under its own label, so one method can appear twice with
    different settings (`--methods calrec,calrec_dense=calrec --set calrec_dense.inference=dense`);
    `--set LABEL.field=value` then applies to that label only.
    """
    label, sep, target = name.partition("=")
    if sep:
        label, target = label.strip(), target.strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label) or not target:
            raise ConfigError(f"--methods {name!r}: write LABEL=METHOD with a label of letters, digits, _ . + -")
        cls = get_method(target)
    else:
        cls = get_method(name)
        label = cls.name if ":" in name else name
    llm = llm if getattr(cls, "uses_llm", False) else None
    resolved = resolve_recipe(cls, label, overrides, device_type=device_type, budget=budget, llm=llm)
    check = getattr(cls, "check_params", None)
    if callable(check):
        check(resolved.params)
    return resolved


def two_stage_report(
    ranked: RankedLists, metrics: dict[str, np.ndarray], targets: np.ndarray
) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """For a reranker: how often the first stage retrieved the target, the final metrics on
    those users and on all, and the first stage's own metrics on the same users.

    Returns (report, hit per user, first-stage per-user metrics).
    """
    first = ranked.first_stage
    assert first is not None
    order = {int(u): i for i, u in enumerate(np.asarray(first.users))}
    rows = np.array([order[int(u)] for u in ranked.users])
    first_items = np.asarray(first.items, dtype=np.int64)[rows]
    width = first_items.shape[1]
    retrieved = int(first.info.get("k", width))  # the reranked depth; a wider list only feeds the tail
    hits = (first_items[:, :retrieved] == targets[:, None]).any(axis=1)
    k = ranked.items.shape[1]
    if width < k:
        first_items = np.pad(first_items, ((0, 0), (0, k - width)), constant_values=PAD)
    first_metrics = per_user_metrics(first_items[:, :k], targets, CUTOFFS)

    def means(values: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
        if mask is not None and not mask.any():
            return {}
        return {m: float(v[mask].mean() if mask is not None else v.mean()) for m, v in values.items()}

    report = {
        "first_stage": first.info.get("method", "first stage"),
        "first_stage_k": retrieved,
        "retrieval_hit_rate": float(hits.mean()),
        "users_with_hit": int(hits.sum()),
        "means_on_hits": means(metrics, hits),
        "first_stage_means": means(first_metrics),
        "first_stage_means_on_hits": means(first_metrics, hits),
    }
    return report, hits, first_metrics


class Runner:
    def __init__(self, opts: RunOptions, split: Split):
        self.opts = opts
        self.split = split
        self.store = RunStore(opts.runs_dir)
        self.device = resolve_device(opts.device)
        opts.eval_users = effective_eval_users(opts.eval_users, len(split.test))  # all users: the full protocol
        self.test = subsample_users(split.test, opts.eval_users)
        kind, _ = parse_protocol(opts.candidates)
        valid_protocol = "full" if kind == "retrieved" else opts.candidates
        self.candidates_source: str | None = None  # retrieved candidates: the retriever unit's key and rankings digest
        self.valid_candidates = build_candidates(valid_protocol, split, split.valid, cache_dir=self.store.cache_dir)
        self.test_candidates = build_candidates(
            opts.candidates, split, self.test, cache_dir=self.store.cache_dir, retrieved_loader=self._retrieved
        )
        self._valid_targets = dict(zip(split.valid.users.tolist(), split.valid.targets.tolist()))
        self.procs = parallel.current()
        self.run_id = parallel.broadcast(opts.run_id or self._new_run_id())  # one run for every process
        self._fitted: dict[str, Any] = {}  # unit key -> fitted non-LLM method, shared within a run
        self._fit_seconds: dict[str, float] = {}
        self._splits: dict[str, Split] = {split.dataset: split}
        self._run_peak: dict[str, Any] = {}  # the largest unit peaks of this run

    # -- helpers -----------------------------------------------------------------------
    def _new_run_id(self) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        name = self.split.dataset.replace(":", "_").replace("/", "_")
        # a random suffix keeps two runs started in the same second apart
        return f"{stamp}-{name}-{self.opts.protocol_label}-{secrets.token_hex(2)}"

    def _retrieved(self, method: str, k: int) -> Retrieved:
        """The most recently written full-ranking unit of `method` on this split, and its identity."""
        best: UnitFiles | None = None
        for unit in self.store.finished_units():
            cfg = unit.config
            if cfg.get("label") == method and cfg.get("split_fingerprint") == self.split.fingerprint and cfg.get(
                "candidates"
            ) == "full" and (best is None or _written_at(unit) >= _written_at(best)):
                best = unit
        if best is None:
            raise ConfigError(
                f"retrieved:{method}:{k} needs a finished {method} run on this split; run "
                f"`python -m benchmark run --methods {method} --dataset {self.split.dataset}` first"
            )
        self.candidates_source = f"{best.config['key']}:{sha256_file(best.path / 'rankings.jsonl')}"
        return Retrieved(self.candidates_source, best.rankings())

    def load_dataset(self, spec: str) -> Split:
        """Another dataset under this run's split protocol and k-core (CALRec's stage 1)."""
        from benchmark.data.split import prepare_split

        spec = spec.strip()
        if spec not in self._splits:
            self._splits[spec] = prepare_split(
                spec, protocol=self.split.protocol, kcore=int(self.split.config.get("kcore", 5)),
                data_dir=self.opts.data_dir if spec == self.split.dataset else None,
                cache_dir=self.store.cache_dir,
            )
        return self._splits[spec]

    def load_method(self, name: str, seed: int) -> Any:
        """A fitted instance of method `name` (resolved with this run's --set overrides) for `seed`.

        A method already fitted in this run (e.g. `--methods sasrec,llamarec`) is shared, so
        a two-stage method's first stage is the very model that was scored on its own.
        """
        resolved = self.resolve(name)
        cls, params = resolved.cls, resolved.params
        if getattr(cls, "uses_llm", False):
            raise ConfigError(f"{name} is an LLM method; only classic methods can serve as a first stage")
        key = unit_key(self._key_payload(resolved, seed))
        if key not in self._fitted:
            ctx = self._context(seed, key)
            method = cls(params, ctx)
            t0 = time.perf_counter()
            method.fit(self.split.train_data())
            self._fit_seconds[key] = time.perf_counter() - t0
            self._fitted[key] = method
        return self._fitted[key]

    def _context(self, seed: int, key: str) -> RunContext:
        return RunContext(
            seed=seed,
            device=self.device,
            work_dir=self.store.work_dir(key),
            validate=self.validate,
            llm=self.opts.llm,
            dataset_loader=self.load_dataset,
            method_loader=lambda name, s=seed: self.load_method(name, s),
            progress=self.opts.progress,
            cache_dir=None if self.opts.force else self.store.cache_dir,
        )

    def _key_payload(self, resolved: Resolved, seed: int) -> dict[str, Any]:
        """Everything that shapes a unit's result: the resolved settings (not "auto"), the recipe
        version and budget, and the device kind, so a GPU run never reuses a CPU-budget unit."""
        cls = resolved.cls
        return {
            "method": resolved.label,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            # harness fields (threads, batch sizes of pure inference loops) change no result
            "params": key_params(resolved.params),
            "recipe_version": resolved.version,
            "budget": resolved.budget,
            "device": torch_device_type(self.device),
            "llm": self.opts.llm if getattr(cls, "uses_llm", False) else None,
            "seed": seed,
            "split": self.split.fingerprint,
            "candidates": self.opts.candidates + (f"@{self.candidates_source}" if self.candidates_source else ""),
            "users": self.opts.eval_users,
            "k": self.opts.k,
        }

    def validate(self, ranked: RankedLists) -> dict[str, float]:
        """Validation metric means for a ranking of (a subset of) the validation users."""
        targets = np.array([self._valid_targets[int(u)] for u in ranked.users], dtype=np.int64)
        metrics = per_user_metrics(np.asarray(ranked.items, dtype=np.int64), targets, CUTOFFS)
        return {name: float(values.mean()) for name, values in metrics.items()}

    # -- one unit ------------------------------------------------------------------------
    def resolve(self, name: str) -> Resolved:
        return resolve_method(name, self.opts.overrides, device_type=torch_device_type(self.device),
                              budget=self.opts.budget, llm=self.opts.llm)

    def run_unit(self, name: str, seed: int) -> UnitOutcome:
        resolved = self.resolve(name)
        cls, label, params = resolved.cls, resolved.label, resolved.params
        key_payload = self._key_payload(resolved, seed)
        key = unit_key(key_payload)
        done = None if self.opts.force else self.store.find_finished(key)
        if parallel.broadcast(done is not None):  # rank 0's store decides for every process
            if not self.procs.main:
                return UnitOutcome(label, seed, self.store.run_dir(self.run_id), {}, True)
            path = self.store.copy_unit(done, self.run_id, label, seed)
            return UnitOutcome(label, seed, path, UnitFiles(path).metrics, True)
        reset_peak_memory(self.device)
        ctx = self._context(seed, key)
        t0 = time.perf_counter()
        if key in self._fitted:  # already fitted as another method's first stage in this run
            method = self._fitted[key]
            train_s = self._fit_seconds.get(key, 0.0)
        else:
            method = cls(params, ctx)
            method.fit(self.split.train_data())
            train_s = time.perf_counter() - t0
            if not getattr(cls, "uses_llm", False):
                self._fitted[key] = method
                self._fit_seconds[key] = train_s
        request = RankRequest(self.test.users, self.test.histories, self.test_candidates, self.opts.k, stage="test")
        t1 = time.perf_counter()
        try:  # each process ranks every world-th user; rank 0 gathers, checks and writes
            part = method.rank(parallel.shard_request(request, self.procs))
        except MethodError as exc:
            raise MethodError(f"method {label}: {exc}") from exc
        parts = parallel.gather(part)
        memory = parallel.gather(peak_memory_mb(self.device))
        if not self.procs.main:
            return UnitOutcome(label, seed, self.store.run_dir(self.run_id), {}, False)
        ranked = parallel.merge_ranked(parts)
        finish = getattr(method, "ranking_info", None)  # facts about all users, recomputed on the merged lists
        if len(parts) > 1 and callable(finish):
            ranked.info.update(finish(ranked, request))
        ranked = check_ranking(ranked, request, self.split.n_items, label)
        eval_s = time.perf_counter() - t1
        return self._write(resolved, seed, key, key_payload, ranked, train_s, eval_s, ctx, merge_memory(memory))

    def _write(self, resolved, seed, key, key_payload, ranked, train_s, eval_s, ctx, memory) -> UnitOutcome:
        label, params = resolved.label, resolved.params
        targets = self.test.targets
        metrics = per_user_metrics(ranked.items, targets, CUTOFFS)
        user_ids = self.split.user_ids
        names = list(metrics)
        per_user_rows = []
        rank_rows = []
        for row, uid in enumerate(ranked.users.tolist()):
            rec = {"user": user_ids[uid], "uid": uid}
            rec.update({m: float(metrics[m][row]) for m in names})
            for extra, values in ranked.extras.items():
                rec[extra] = float(values[row])
            per_user_rows.append(rec)
            items = ranked.items[row]
            keep = items != PAD
            rank_rows.append(
                {
                    "user": user_ids[uid],
                    "uid": uid,
                    "target": int(targets[row]),
                    "items": items[keep].tolist(),
                    "scores": None if ranked.scores is None else [round(float(s), 6) for s in ranked.scores[row][keep]],
                }
            )
        two_stage = None
        if ranked.first_stage is not None:
            two_stage, hits, first = two_stage_report(ranked, metrics, targets)
            for row, rec in enumerate(per_user_rows):
                rec["in_first_stage"] = float(hits[row])
                rec["first_stage_ndcg@10"] = float(first["ndcg@10"][row])
        in_cands = target_in_candidates(self.test_candidates, targets)
        cached_train = _cached_train_seconds(ctx.notes)
        resumed_train = 0.0 if cached_train is not None else _resumed_train_seconds(ctx.notes)
        summary = {
            "means": {m: float(v.mean()) for m, v in metrics.items()},
            "coverage@10": coverage(ranked.items, self.split.n_items, k=10),
            "n_users": int(len(targets)),
            "target_in_candidates": float(in_cands.mean()),
            # a model loaded from the fitted-model cache reports the training time of the cached fit
            # one resumed after an interruption adds the training time of the attempts before it
            "train_time_s": round(train_s + resumed_train if cached_train is None else cached_train, 3),
            "fit_wall_s": round(train_s, 3),  # fit() in this run (loading, when cached)
            "train_resumed_s": round(resumed_train, 3),  # included in train_time_s
            "train_cached": cached_train is not None,
            "eval_time_s": round(eval_s, 3),
            "peak_memory": memory,
            "processes": self.procs.world,
            "validity": float(np.mean(ranked.extras["valid"])) if "valid" in ranked.extras else None,
            "two_stage": two_stage,
            "info": {**ranked.info, **ctx.notes, "recipe_note": resolved.note()},
        }
        config = {
            "key": key,
            "label": label,
            "method": key_payload["class"],
            "params": params_dict(params),
            "recipe": resolved.to_dict(),
            "seed": seed,
            "dataset": self.split.dataset,
            "split": self.split.protocol,
            "split_fingerprint": self.split.fingerprint,
            "candidates": self.opts.candidates,
            "candidates_source": self.candidates_source,
            "protocol": self.opts.protocol_label,
            "eval_users": self.opts.eval_users,
            "k": self.opts.k,
            "llm": key_payload["llm"],
            "device": self.device,
            "run_id": self.run_id,
        }
        for name, value in memory.items():
            if isinstance(value, (int, float)):
                self._run_peak[name] = max(self._run_peak.get(name, 0.0), float(value))
        path = self.store.write_unit(self.run_id, label, seed, config, rank_rows, per_user_rows, summary)
        return UnitOutcome(label, seed, path, summary, False)

    # -- the whole run -----------------------------------------------------------------
    def run(self) -> list[UnitOutcome]:
        opts = self.opts
        settings = {}
        for name in opts.methods:  # every name and override is checked before anything is written
            resolved = self.resolve(name)
            llm = opts.llm if getattr(resolved.cls, "uses_llm", False) else None
            settings[resolved.label] = {"params": params_dict(resolved.params), "llm": llm,
                                        "recipe": resolved.to_dict()}
        meta = {
            "run_id": self.run_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": self.split.dataset,
            "split": self.split.protocol,
            "split_config": self.split.config,
            "split_fingerprint": self.split.fingerprint,
            "candidates": opts.candidates,
            "candidates_source": self.candidates_source,
            "protocol": opts.protocol_label,
            "eval_users": opts.eval_users,
            "n_test_users": int(len(self.test)),
            "split_stats": {
                "users": self.split.n_users,
                "items": self.split.n_items,
                "train interactions": int(sum(len(t) for t in self.split.train)),
                "valid users": int(len(self.split.valid)),
                "test users": int(len(self.split.test)),
            },
            "methods": opts.methods,
            "seeds": opts.seeds,
            "overrides": opts.overrides,
            "budget": opts.budget,
            "recipes": {label: value["recipe"] for label, value in settings.items()},
            "llm": opts.llm,
            "manifest": manifest(self.device, processes=self.procs.world),
            "status": "running",
            "stages": {},
        }
        main = self.procs.main  # rank 0 alone reads and writes the run store
        if main:  # an existing run must be of this dataset, protocol and data, and keep one configuration per label
            check_run_target(self.store, self.run_id, meta)
            check_label_settings(self.store, self.run_id, settings, opts.seeds)
            previous = self.store.run_dir(self.run_id) / "run.json"
            if previous.is_file():  # a rerun or resume: merge with what the run already holds
                meta = merge_run_meta(self.store.run_meta(self.run_id), meta, list(settings))
            self.store.start_run(self.run_id, meta)
        parallel.barrier()
        outcomes: list[UnitOutcome] = []
        try:
            for name in opts.methods:
                for seed in opts.seeds:
                    t0 = time.perf_counter()
                    outcome = self.run_unit(name, seed)
                    outcomes.append(outcome)
                    meta["stages"][f"{outcome.label}/seed-{seed}"] = {
                        "wall_s": round(time.perf_counter() - t0, 3),
                        "reused": outcome.reused,
                    }
                    if main:
                        self.store.update_run(self.run_id, stages=meta["stages"])
        except BaseException as exc:
            if main:
                self.store.record_failure(self.run_id, exc)
            raise
        if main:
            self.store.update_run(self.run_id, status="finished", peak_memory=self._run_peak or peak_memory_mb(self.device))
        return outcomes
