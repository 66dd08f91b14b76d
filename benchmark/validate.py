"""Checks of a run's command-line settings and of a rerun into an existing run.

Each check raises ConfigError (or StoreError) naming the problem and the fix, before the
work or the write it guards; none of them reads dataset files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from benchmark.errors import ConfigError, StoreError
from benchmark.store import RunStore, dumps, read_json

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=,@-]{0,254}")  # what generated ids hold; one path component
MAX_SEED = 2**32 - 1
# what a run is checked against before anything is written into it; the early check (before the
# split exists) compares the first three, the runner all of them
RUN_IDENTITY = ("dataset", "split", "candidates", "protocol", "split_fingerprint", "candidates_source")


def parse_seeds(text: str) -> list[int]:
    """--seeds "0,1,2" -> [0, 1, 2]: integers from 0 to 2**32-1, none repeated."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds needs at least one seed, e.g. --seeds 0")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ConfigError(f"--seeds: {bad[0]} is out of range; each seed must be an integer from 0 to {MAX_SEED}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} repeats a seed; give each seed once")
    return seeds


def check_run_id(run_id: str | None, runs_dir: Path) -> None:
    """A run id is one directory name inside the runs directory (no '/', '..' or leading dot)."""
    if run_id is None:
        return
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(
            f"--run-id {run_id!r}: a run id is one name inside {runs_dir} (a letter or digit, then letters, digits "
            "and _ . + = , @ -; no '/'), e.g. --run-id ml100k-sasrec"
        )


def check_ranking_length(k: int, cutoffs: Iterable[int]) -> None:
    """--k must reach the largest metric cutoff."""
    need = max(cutoffs)
    if k < need:
        raise ConfigError(f"--k {k}: ranked lists must hold at least {need} items (metrics go up to @{need}); "
                          f"use --k {need} or more")


def check_k_fits_catalog(k: int, n_items: int) -> None:
    if k > n_items:
        raise ConfigError(f"--k {k} is longer than the catalog ({n_items} items); use --k {n_items} or less")


def check_eval_users(n: int | None) -> None:
    if n is not None and n < 1:
        raise ConfigError(f"--eval-users {n}: give a positive number of test users, or leave it out for all of them")


def effective_eval_users(n: int | None, n_test: int) -> int | None:
    """--eval-users at or above the number of test users means all of them: the full protocol (None)."""
    return None if n is None or n >= n_test else n


def run_labels(resolved: Iterable[Any]) -> list[str]:
    """Labels a run's overrides may name: its methods' labels and the registered methods their
    string hyperparameters name (first stages such as llamarec.retriever=sasrec)."""
    import dataclasses

    from benchmark.registry import available_methods

    registered = available_methods()
    labels: list[str] = []
    for item in resolved:  # benchmark.recipes.Resolved
        label, params = item.label, item.params
        labels.append(label)
        for f in dataclasses.fields(params):
            value = getattr(params, f.name)
            if isinstance(value, str) and value in registered:
                labels.append(value)
    return list(dict.fromkeys(labels))


def check_labels(overrides: dict[str, Any], labels: list[str], source: str) -> None:
    """Every label that `--set` or a `--config` table names must be run (or serve as a first stage)."""
    unknown = [name for name in overrides if name not in labels]
    if unknown:
        fields = overrides[unknown[0]] or {"FIELD": None}
        example = f"--set {unknown[0]}.{next(iter(fields))}" if source == "--set" else f"[{unknown[0]}] in {source}"
        raise ConfigError(
            f"{example} names {unknown[0]!r}, which is not a method of this run; this run has: {', '.join(labels)} "
            "(check the spelling, or add it to --methods)"
        )


def check_unique_labels(labels: list[str]) -> None:
    seen = {label for label in labels if labels.count(label) > 1}
    if seen:
        raise ConfigError(f"--methods names {sorted(seen)[0]!r} more than once; give each method once "
                          "(or another label: LABEL=METHOD)")


# ----------------------------------------------------------------------------- an existing run


def _existing_identity(store: RunStore, run_id: str) -> tuple[dict, str] | None:
    """What an existing run directory holds (run.json, else a unit's config.json), and where it was read."""
    folder = store.run_dir(run_id)
    if not folder.exists():
        return None
    if (folder / "run.json").is_file():
        return store.run_meta(run_id), str(folder / "run.json")
    for config in sorted(folder.glob("*/seed-*/config.json")):
        return read_json(config), str(config)
    return None


def check_run_target(store: RunStore, run_id: str | None, expected: dict[str, Any]) -> None:
    """Refuse to write into an existing run of another dataset, split, candidates, protocol or data version."""
    if run_id is None:
        return
    found = _existing_identity(store, run_id)
    if found is None:
        return
    held, where = found
    for field in RUN_IDENTITY:
        if field in expected and field in held and held[field] != expected[field]:
            what = {"split_fingerprint": "another version of the data",
                    "candidates_source": "candidates from another retriever fit"}.get(field, f"another {field}")
            raise StoreError(
                f"--run-id {run_id} holds a run of {what} ({field} {held[field]!r} in {where}; this command: "
                f"{expected[field]!r}); writing into it would mix or replace its results: omit --run-id for a new "
                "run, or choose another id"
            )


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])


def check_label_settings(store: RunStore, run_id: str, settings: dict[str, dict], seeds: list[int]) -> None:
    """A label holds one configuration within a run: a unit of a label this command runs, with a seed it
    does not rerun, must have the same params and llm as this command resolves (else its seeds would mix)."""
    folder = store.run_dir(run_id)
    for label, new in settings.items():
        for config in sorted(folder.glob(f"{label}/seed-*/config.json")):
            held = read_json(config)
            if held.get("seed") in seeds:
                continue  # rewritten by this command
            old = {"params": held.get("params"), "llm": held.get("llm")}
            new = {"params": new["params"], "llm": new["llm"]}
            if json.loads(dumps(new)) != old:
                diff = _differences(old["params"] or {}, new["params"]) or _differences(old, new)
                raise StoreError(
                    f"run {run_id} holds {label}/seed-{held.get('seed')} with other settings ({diff}); rerun all its "
                    f"seeds so {label} holds one configuration, give this one its own label "
                    f"(--methods {label}_2={label}), or omit --run-id"
                )


def merge_run_meta(old: dict, new: dict, labels: list[str]) -> dict:
    """run.json for a rerun into an existing run: methods and seeds are the union of both; each label's
    overrides are those of the command that last wrote its units; the first creation time and every
    stage timing are kept."""
    merged = dict(new)
    merged["created"] = old.get("created", new["created"])
    merged["stages"] = dict(old.get("stages") or {})
    merged["methods"] = list(dict.fromkeys(list(old.get("methods") or []) + list(new["methods"])))
    merged["seeds"] = sorted(set(old.get("seeds") or []) | set(new["seeds"]))
    kept = {k: v for k, v in (old.get("overrides") or {}).items() if k not in labels and k not in new["overrides"]}
    merged["overrides"] = {**kept, **new["overrides"]}
    return merged
