"""Checks on every unit a leaderboard reads, local or published, before anything is built or written.

- every per-user value lies inside its metric's range (HR, NDCG, MRR, Recall, validity: [0, 1]);
- each unit holds each user once, as many users as its run evaluated (run.json n_test_users);
- every unit covers the same user set, equal to the expected one where it is known (the
  runner's test users or subsample, or the published evidence's user set);
- the per-user means equal the means in metrics.json (relative tolerance 1e-9).

Each failure is an IntegrityError of one line naming the unit, the user and the metric.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from benchmark.errors import ConfigError, IntegrityError
from benchmark.evidence import Evidence, Unit, users_fingerprint
from benchmark.scoring.metrics import parse_metric

MEAN_RTOL = 1e-9
UNIT_RANGE = (0.0, 1.0)
_BOUNDED = {"hr", "ndcg", "mrr", "recall"}  # every metric of benchmark.scoring.metrics lies in [0, 1]
_BOUNDED_EXTRAS = {"valid", "in_first_stage"}  # shares and flags a method or the runner adds per user


def value_range(column: str) -> tuple[float, float] | None:
    """The range of a per-user column ("ndcg@10", "first_stage_ndcg@10", "valid"), or None if unknown."""
    name = column.removeprefix("first_stage_")
    if name in _BOUNDED_EXTRAS:
        return UNIT_RANGE
    try:
        kind, _ = parse_metric(name)
    except ConfigError:
        return None
    return UNIT_RANGE if kind in _BOUNDED else None


def _shown(value) -> str:
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return repr(value)


def check_values(unit: Unit, frame: pd.DataFrame) -> None:
    for column in frame.columns:
        bounds = value_range(column)
        if bounds is None:
            continue
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values < bounds[0]) | (values > bounds[1])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise IntegrityError(
                f"{unit.where}: user {frame['user'].iloc[row]!r} has {column} = {_shown(frame[column].iloc[row])}, outside "
                f"[{bounds[0]:g}, {bounds[1]:g}] ({int(bad.sum())} such value(s)); the per-user file was edited or is "
                "damaged: rerun the unit, or restore the published file (git checkout)"
            )


def check_means(unit: Unit, frame: pd.DataFrame) -> None:
    for metric, stated in sorted((unit.metrics.get("means") or {}).items()):
        if metric not in frame:
            raise IntegrityError(f"{unit.where}: metrics.json has a mean of {metric} but per_user.jsonl has no such column")
        mean = float(frame[metric].to_numpy(dtype=np.float64).mean())
        if not math.isclose(mean, float(stated), rel_tol=MEAN_RTOL, abs_tol=1e-12):
            raise IntegrityError(
                f"{unit.where}: the mean of its per-user {metric} is {mean!r} but metrics.json says {stated!r}; "
                "one of the two files was edited: rerun the unit, or restore the published files (git checkout)"
            )


def check_user_count(unit: Unit, frame: pd.DataFrame) -> None:
    users = frame["user"]
    if users.duplicated().any():
        raise IntegrityError(f"{unit.where}: user {users[users.duplicated()].iloc[0]!r} appears twice in per_user.jsonl")
    expected = unit.run.get("n_test_users")
    if expected is None:
        expected = unit.metrics.get("n_users")
    if expected is not None and len(users) != int(expected):
        raise IntegrityError(
            f"{unit.where}: per_user.jsonl holds {len(users)} users but its run evaluated {int(expected)} "
            "(run.json n_test_users); users were deleted or added: rerun the unit, or restore the published files"
        )


def check_unit(unit: Unit, frame: pd.DataFrame) -> None:
    """Values in range, each user once and as many as the run evaluated, means as stated."""
    check_values(unit, frame)
    check_user_count(unit, frame)
    check_means(unit, frame)


def check_same_users(frames: list[tuple[Unit, pd.DataFrame]], expected: set[str] | None, expected_from: str) -> set[str]:
    """Every unit covers one user set, the expected one where given; returns that set."""
    reference = expected
    ref_name = expected_from
    for unit, frame in frames:
        users = set(frame["user"])
        if reference is None:
            reference, ref_name = users, unit.where
            continue
        if users != reference:
            missing, extra = sorted(reference - users), sorted(users - reference)
            example = (missing + extra)[0]
            raise IntegrityError(
                f"{unit.where} was evaluated on other users than {ref_name}: {len(missing)} missing, "
                f"{len(extra)} extra (e.g. {example!r}; user sets {users_fingerprint(users)} vs "
                f"{users_fingerprint(reference)}); every row needs the protocol's test users"
            )
    return reference or set()


def check_published_users(evidence: Evidence, users: set[str]) -> None:
    """The published units still hold the user set the evidence index recorded at publication."""
    recorded, n = evidence.index.get("users_fingerprint"), evidence.index.get("n_users")
    if users_fingerprint(users) != recorded or len(users) != n:
        raise IntegrityError(
            f"{evidence.folder}/: its rows hold {len(users)} users (user set {users_fingerprint(users)}) but "
            f"evidence.json recorded {n} (user set {recorded}) at publication; the files were edited: restore them "
            "(git checkout)"
        )
