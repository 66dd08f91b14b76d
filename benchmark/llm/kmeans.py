"""Seeded k-means (k-means++ seeding, Lloyd iterations) in numpy; no scikit-learn needed.

Used by P2Rec to cut a pre-trained sequential model's item embeddings into K latent
categories. Deterministic for a given seed: the restarts draw from one numpy Generator,
and ties in the assignment go to the lowest cluster index.

- k-means++ seeding (Arthur & Vassilvitskii 2007): the first centre uniformly, each next
  one with probability proportional to the squared distance to the nearest chosen centre
  (uniformly among unchosen points when every remaining distance is zero, i.e. there are
  fewer distinct points than k).
- Lloyd iterations until no assignment changes (or the centres move less than `tol`
  relative to the data's variance, or `max_iter`).
- An empty cluster takes the point farthest from its current centre, so exactly k
  non-empty clusters come back whenever there are at least k points.
- `n_init` restarts; the one with the lowest inertia (sum of squared distances) wins.
- Distances are computed in row chunks, so a catalog of 10^6 items never builds more than a
  [chunk, k] matrix at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmark.errors import ConfigError

_CHUNK = 65536


@dataclass
class KMeansResult:
    labels: np.ndarray  # int64 [n], cluster of each point
    centroids: np.ndarray  # float64 [k, d]
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int  # Lloyd iterations of the winning restart

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.centroids))


def _sq_dists(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [n, k] (clipped at 0 against rounding)."""
    d = x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _assign(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n], squared distance to the assigned centroid [n]), in chunks."""
    labels = np.empty(len(x), dtype=np.int64)
    best = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), _CHUNK):
        d = _sq_dists(x[start : start + _CHUNK], x_sq[start : start + _CHUNK], c)
        lab = d.argmin(1)  # first minimum: ties go to the lowest index
        labels[start : start + _CHUNK] = lab
        best[start : start + _CHUNK] = d[np.arange(len(lab)), lab]
    return labels, best


def _plus_plus(x: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    chosen = [int(rng.integers(n))]
    closest = _sq_dists(x, x_sq, x[chosen[0]][None, :])[:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total > 0:
            idx = int(rng.choice(n, p=closest / total))
        else:  # fewer distinct points than k: any point not yet chosen
            rest = np.setdiff1d(np.arange(n), chosen)
            idx = int(rng.choice(rest))
        chosen.append(idx)
        closest = np.minimum(closest, _sq_dists(x, x_sq, x[idx][None, :])[:, 0])
    return x[chosen].copy()


def _fill_empty(labels: np.ndarray, dist: np.ndarray, k: int) -> None:
    """In place: each empty cluster takes the point farthest from its centroid (one each),
    taken only from clusters that keep at least one point."""
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return
    taken = 0
    for idx in np.argsort(-dist, kind="stable"):
        if taken == len(empty):
            break
        if counts[labels[idx]] > 1:
            counts[labels[idx]] -= 1
            labels[idx] = empty[taken]
            counts[empty[taken]] += 1
            dist[idx] = 0.0
            taken += 1


def _lloyd(
    x: np.ndarray, x_sq: np.ndarray, centroids: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray, float, int]:
    k = len(centroids)
    labels = None
    it = 0
    for it in range(1, max_iter + 1):
        new_labels, dist = _assign(x, x_sq, centroids)
        _fill_empty(new_labels, dist, k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, new_labels, x)
        counts = np.bincount(new_labels, minlength=k)
        moved = sums / np.maximum(counts, 1)[:, None]
        moved[counts == 0] = centroids[counts == 0]
        shift = float(((moved - centroids) ** 2).sum())
        converged = labels is not None and np.array_equal(labels, new_labels)
        centroids, labels = moved, new_labels
        if converged or shift <= tol:
            break
    labels, dist = _assign(x, x_sq, centroids)
    _fill_empty(labels, dist, k)
    inertia = float(((x - centroids[labels]) ** 2).sum())
    return labels, centroids, inertia, it


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100, tol: float = 1e-8
) -> KMeansResult:
    """Cluster the rows of `x` [n, d] into k groups (seeded, deterministic)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"k-means needs a 2-D array of points, got shape {x.shape}")
    n = len(x)
    if not 1 <= k <= n:
        raise ConfigError(f"k-means: k={k} clusters asked for {n} points; k must be between 1 and {n}")
    if not np.isfinite(x).all():
        raise ConfigError("k-means: the points contain NaN or inf")
    if n_init < 1 or max_iter < 1:
        raise ConfigError("k-means: n_init and max_iter must be at least 1")
    x_sq = (x * x).sum(1)
    scale = float(x.var(0).sum()) or 1.0
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        start = _plus_plus(x, x_sq, k, rng)
        labels, centroids, inertia, it = _lloyd(x, x_sq, start, max_iter, tol * scale)
        if best is None or inertia < best.inertia - 1e-12 * max(1.0, abs(best.inertia)):
            best = KMeansResult(labels, centroids, inertia, it)
    assert best is not None
    return best
