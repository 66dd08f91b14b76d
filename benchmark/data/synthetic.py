"""A seeded synthetic dataset with planted sequential structure, and `tiny_split` for unit tests.

Items fall into clusters (the cluster name is the item's genre). Each user walks a Markov
chain over clusters: from cluster c the next step goes to cluster c+1 with probability
`p_next`, otherwise to a uniformly random cluster. Within a cluster the user picks an item
not seen yet, with a Zipf popularity skew. So the next item is predictable from the last
one (a transition model wins) and popularity alone is a weak guess.

Specs: `synthetic`, `synthetic:7` (seed 7), `synthetic:seed=7,n_users=100,n_items=50`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.errors import ConfigError
from benchmark.types import RawDataset, Split

_SYLLABLES = (
    "ka", "lo", "mi", "ren", "sa", "tor", "vel", "dun", "pri", "zo", "ba", "nel", "qua", "fi",
    "gor", "lin", "mar", "tes", "ou", "bri", "cal", "dre", "ves", "ny", "ro", "sul", "ta", "we",
)  # fmt: skip


@dataclass
class SyntheticConfig:
    n_users: int = 300
    n_items: int = 200
    n_clusters: int = 0  # 0: one cluster per 20 items (at least 2)
    min_len: int = 20  # interactions per user, before preprocessing
    max_len: int = 40
    p_next: float = 0.85  # probability that the next cluster is c + 1
    zipf: float = 1.0  # popularity skew inside a cluster
    seed: int = 0

    def clusters(self) -> int:
        return self.n_clusters or max(2, self.n_items // 20)


def parse_spec(spec: str, **opts) -> SyntheticConfig:
    """'synthetic', 'synthetic:7' or 'synthetic:seed=7,n_users=100' (+ keyword opts) -> config."""
    fields = {f.name: f for f in dataclasses.fields(SyntheticConfig)}
    values: dict[str, object] = {}
    _, _, rest = spec.partition(":")
    for part in (p.strip() for p in rest.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq:
            key, value = "seed", part
        values[key.strip()] = value.strip()
    values.update(opts)
    out: dict[str, object] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"synthetic dataset: unknown option {key!r}; options: {', '.join(fields)}")
        kind = float if fields[key].type in (float, "float") else int
        try:
            out[key] = kind(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"synthetic dataset: {key}={value!r} is not a {kind.__name__}") from exc
    cfg = SyntheticConfig(**out)  # type: ignore[arg-type]
    if cfg.n_users < 1 or cfg.n_items < 2 or cfg.min_len < 1 or cfg.max_len < cfg.min_len:
        raise ConfigError(f"synthetic dataset: need n_users >= 1, n_items >= 2, 1 <= min_len <= max_len; got {cfg}")
    if not 0.0 <= cfg.p_next <= 1.0:
        raise ConfigError(f"synthetic dataset: p_next must be in [0, 1], got {cfg.p_next}")
    return cfg


def _names(rng: np.random.Generator, count: int, words: tuple[int, int]) -> list[str]:
    """`count` unique pronounceable names of words[0]..words[1] words."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        n_words = int(rng.integers(words[0], words[1] + 1))
        parts = []
        for _ in range(n_words):
            syl = rng.choice(len(_SYLLABLES), size=int(rng.integers(2, 4)))
            parts.append("".join(_SYLLABLES[s] for s in syl).capitalize())
        name = " ".join(parts)
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def generate(cfg: SyntheticConfig) -> RawDataset:
    """Draw the dataset described by `cfg` (same cfg, same data)."""
    rng = np.random.default_rng(cfg.seed)
    n_clusters = min(cfg.clusters(), cfg.n_items)
    cluster_of = rng.permutation(np.arange(cfg.n_items) % n_clusters)
    weight = np.empty(cfg.n_items)
    members = []
    for c in range(n_clusters):
        items = np.flatnonzero(cluster_of == c)
        ranks = rng.permutation(len(items))
        weight[items] = 1.0 / (ranks + 1.0) ** cfg.zipf
        members.append(items)
    cluster_names = _names(rng, n_clusters, (1, 1))
    titles = _names(rng, cfg.n_items, (1, 3))
    years = rng.integers(1950, 2021, size=cfg.n_items)

    users, items_out, times = [], [], []
    max_len = min(cfg.max_len, cfg.n_items)
    min_len = min(cfg.min_len, max_len)
    for user in range(cfg.n_users):
        length = int(rng.integers(min_len, max_len + 1))
        seen = np.zeros(cfg.n_items, dtype=bool)
        cluster = int(rng.integers(n_clusters))
        t = int(rng.integers(0, 10_000_000)) + 1_000_000_000
        for _ in range(length):
            pool = members[cluster][~seen[members[cluster]]]
            if len(pool) == 0:
                pool = np.flatnonzero(~seen)
            p = weight[pool] / weight[pool].sum()
            item = int(pool[rng.choice(len(pool), p=p)])
            seen[item] = True
            users.append(user + 1)
            items_out.append(item + 1)
            times.append(t)
            t += int(rng.integers(60, 86_400))
            cluster = (cluster + 1) % n_clusters if rng.random() < cfg.p_next else int(rng.integers(n_clusters))
    interactions = pd.DataFrame(
        {
            "user": pd.Series(users).astype(str),
            "item": pd.Series(items_out).astype(str),
            "timestamp": np.asarray(times, dtype=np.int64),
        }
    )
    catalog = pd.DataFrame(
        {
            "item": [str(i + 1) for i in range(cfg.n_items)],
            "title": titles,
            "year": pd.array(years, dtype="Int64"),
            "genres": [cluster_names[c] for c in cluster_of],
        }
    )
    return RawDataset(name="synthetic", interactions=interactions, items=catalog, source=f"synthetic:{cfg}")


def load_synthetic(spec: str = "synthetic", data_dir: Path | None = None, **opts) -> RawDataset:
    """Seeded synthetic sessions with planted cluster transitions."""
    opts.pop("progress", None)
    return generate(parse_spec(spec, **opts))


def tiny_split(
    seed: int = 0, n_users: int = 60, n_items: int = 40, protocol: str = "loo", kcore: int = 5, **opts
) -> Split:
    """A small synthetic Split built in memory (no disk), for other modules' unit tests."""
    from benchmark.data.split import build_split

    opts.setdefault("min_len", min(20, max(6, n_items // 3)))
    opts.setdefault("max_len", min(40, max(opts["min_len"], n_items // 2)))
    cfg = parse_spec("synthetic", seed=seed, n_users=n_users, n_items=n_items, **opts)
    spec = "synthetic:" + ",".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
    return build_split(generate(cfg), protocol=protocol, kcore=kcore, spec=spec)
