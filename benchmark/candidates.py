"""Candidate sets: created once per split and protocol, stored, and shared by every method.

    full                  every item the user has not seen (the default)
    sampled:N[:uniform|pop]   the target plus N negatives the user has not seen (seeded)
    retrieved:METHOD:K    the top-K of another method's finished run on the same split;
                          a target outside it is a miss for every method ranked on it

Cached sets are keyed by the split, the protocol, the evaluated users and, for retrieved
sets, the retriever's unit key and the digest of its rankings: a retrained retriever gives
new candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from benchmark.errors import ConfigError, StoreError
from benchmark.store import umask_mode
from benchmark.types import PAD, CandidateSet, EvalSet, Split

PROTOCOLS = {
    "full": "every unseen catalog item (default)",
    "sampled:N[:uniform|pop]": "target + N sampled unseen negatives; sampled metrics can reorder methods",
    "retrieved:METHOD:K": "top-K of a finished METHOD run on the same split (two-stage rerankers)",
}


class Retrieved(NamedTuple):
    """A retriever's finished rankings and what identifies them (its unit key + rankings digest)."""

    source: str
    rankings: dict[int, list[int]]


def parse_protocol(text: str) -> tuple[str, list[str]]:
    parts = text.split(":")
    kind = parts[0]
    if kind == "full" and len(parts) == 1:
        return kind, []
    if kind == "sampled" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) > 0:
        if len(parts) == 3 and parts[2] not in ("uniform", "pop"):
            raise ConfigError(f"candidate protocol {text!r}: sampler must be uniform or pop")
        return kind, parts[1:]
    if kind == "retrieved" and len(parts) == 3 and parts[2].isdigit() and int(parts[2]) > 0:
        return kind, parts[1:]
    raise ConfigError(
        f"unknown candidate protocol {text!r}; use full, sampled:N[:uniform|pop] or retrieved:METHOD:K"
    )


def sampled_candidates(split: Split, evalset: EvalSet, n: int, sampler: str, seed: int) -> np.ndarray:
    """Row u: the target first, then n distinct negatives outside the user's history (seeded)."""
    rng = np.random.default_rng(seed)
    n_items = split.n_items
    free = [n_items - len(np.union1d(hist, [target])) for target, hist in zip(evalset.targets, evalset.histories)]
    if free and min(free) < n:
        row = int(np.argmin(free))
        raise ConfigError(
            f"--candidates sampled:{n}: user {int(evalset.users[row])} has only {free[row]} unseen items to "
            f"sample from (catalog of {n_items}); use sampled:{min(free)} or fewer, or --candidates full"
        )
    if sampler == "pop":
        counts = np.bincount(np.concatenate([s for s in split.train if len(s)] or [np.zeros(0, int)]), minlength=n_items)
        probs = (counts + 1.0) / (counts + 1.0).sum()
    else:
        probs = None
    out = np.full((len(evalset), n + 1), PAD, dtype=np.int64)
    for row, (target, hist) in enumerate(zip(evalset.targets, evalset.histories)):
        forbidden = np.zeros(n_items, dtype=bool)
        forbidden[hist] = True
        forbidden[target] = True
        allowed = np.flatnonzero(~forbidden)
        p = None if probs is None else probs[allowed] / probs[allowed].sum()
        out[row, 0] = target
        out[row, 1:] = rng.choice(allowed, size=n, replace=False, p=p)
    return out


def stored_path(
    cache_dir: Path, split_fingerprint: str, protocol: str, users: np.ndarray, targets: np.ndarray, seed: int = 0,
    source: str | None = None,
) -> Path:
    """Where a non-full candidate set for these test users (and targets) is stored under the cache;
    `source` names the retriever fit of retrieved candidates (a retrained retriever: new candidates)."""
    digest = hashlib.sha256(json.dumps([split_fingerprint, protocol, seed] + ([source] if source else [])).encode())
    digest.update(np.ascontiguousarray(users, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    return Path(cache_dir) / "candidates" / f"{digest.hexdigest()[:16]}.npz"


def candidate_fingerprint(protocol: str, split_fingerprint: str, users=None, items=None) -> str:
    """Names a candidate set: for `full` (every unseen item) a hash of the split fingerprint and the
    protocol, which determine it; otherwise a hash of the protocol and the stored arrays."""
    if items is None:
        if parse_protocol(protocol)[0] != "full":
            raise StoreError(f"candidate protocol {protocol!r} needs its stored candidate arrays to be fingerprinted")
        return hashlib.sha256(json.dumps([split_fingerprint, protocol]).encode()).hexdigest()[:16]
    digest = hashlib.sha256(json.dumps([protocol]).encode())
    digest.update(np.ascontiguousarray(users, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(items, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def build_candidates(
    protocol: str,
    split: Split,
    evalset: EvalSet,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    retrieved_loader: Callable[[str, int], Retrieved] | None = None,
) -> CandidateSet:
    """Create (or load from the cache) the candidate set for `evalset` under `protocol`."""
    kind, args = parse_protocol(protocol)
    if kind == "full":
        return CandidateSet("full", evalset.users.copy(), None, True)
    retrieved = None
    if kind == "retrieved":
        if retrieved_loader is None:
            raise ConfigError(f"{protocol}: retrieved candidates need a run store with a finished {args[0]} run")
        retrieved = retrieved_loader(args[0], int(args[1]))
    source = None if retrieved is None else retrieved.source
    path = None if cache_dir is None else stored_path(
        cache_dir, split.fingerprint, protocol, evalset.users, evalset.targets, seed, source=source)
    if path is not None and path.is_file():
        with np.load(path) as z:
            return CandidateSet(protocol, z["users"], z["items"], True)
    if kind == "sampled":
        sampler = args[1] if len(args) == 2 else "uniform"
        items = sampled_candidates(split, evalset, int(args[0]), sampler, seed)
    else:
        method, k = args[0], int(args[1])
        rankings = retrieved.rankings
        missing = [int(u) for u in evalset.users if int(u) not in rankings]
        if missing:
            raise StoreError(
                f"{protocol}: the {method} run lacks {len(missing)} of the evaluated users; "
                f"run `python -m benchmark run --methods {method}` on the same dataset and protocol first"
            )
        items = np.full((len(evalset), k), PAD, dtype=np.int64)
        for row, user in enumerate(evalset.users):
            top = rankings[int(user)][:k]
            items[row, : len(top)] = top
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.fchmod(fd, umask_mode())
        os.close(fd)
        try:
            np.savez(tmp, users=evalset.users, items=items)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return CandidateSet(protocol, evalset.users.copy(), items, True)


def target_in_candidates(cands: CandidateSet, targets: np.ndarray) -> np.ndarray:
    """Per user, whether the target can be ranked at all (always true for full ranking)."""
    if cands.items is None:
        return np.ones(len(targets), dtype=bool)
    return (cands.items == targets[:, None]).any(axis=1)
