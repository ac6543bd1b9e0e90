"""Fisher's optimal segmentation of an ordered sequence (SGLP's partition step; docs/algorithms.md section 3).

Layers 0..L-1, each described by a vector a_t (in SGLP, its row of the CKA matrix), are split into K contiguous,
non-empty segments minimising the summed within-segment squared deviation. With half-open ranges [i, j):

    D(i, j)    = sum_{t=i..j-1} ||a_t - mean(a_i..a_{j-1})||^2 = S2[j] - S2[i] - ||S1[j] - S1[i]||^2 / (j - i)
    P(1, n)    = D(0, n)
    P(k, n)    = min over j = k-1..n-1 of P(k-1, j) + D(j, n)

where S1, S2 are prefix sums of a_t and of ||a_t||^2, so every D is O(1) once they are known (building the whole
D table costs O(L^2 d) for d-dimensional vectors), and the DP O(K L^2), one vectorised step per k. Exact, with
back-pointers; ties go to the earliest split point. One table answers every K up to the largest: ``losses`` reads
the whole loss curve from it, and ``elbow`` picks K from that curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segmentation:
    bounds: tuple[tuple[int, int], ...]  # [start, end) of each segment, in order, covering 0..L
    loss: float  # summed within-segment squared deviation

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.bounds)

    def segment_of(self, index: int) -> int:
        return next(k for k, (s, e) in enumerate(self.bounds) if s <= index < e)


def _vectors(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    a = a.reshape(len(a), -1) if a.ndim != 1 else a[:, None]
    if len(a) == 0:
        raise ValueError("nothing to segment")
    return a


def diameters(values) -> np.ndarray:
    """(L+1) x (L+1) table of D(i, j) for i < j (inf elsewhere), from prefix sums."""
    a = _vectors(values)
    n = len(a)
    s1 = np.vstack([np.zeros(a.shape[1]), np.cumsum(a, axis=0)])
    s2 = np.concatenate([[0.0], np.cumsum((a * a).sum(axis=1))])
    i, j = np.triu_indices(n + 1, k=1)
    table = np.full((n + 1, n + 1), np.inf)
    diff = s1[j] - s1[i]
    table[i, j] = np.maximum(s2[j] - s2[i] - (diff * diff).sum(axis=1) / (j - i), 0.0)  # >= 0 up to rounding
    return table


def _table(values, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    cost = diameters(values)
    n = len(cost) - 1
    if not 1 <= k_max <= n:
        raise ValueError(f"the number of segments must lie in 1..{n}, not {k_max}")
    best = np.full((k_max + 1, n + 1), np.inf)
    split = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    best[1] = cost[0]
    for k in range(2, k_max + 1):
        candidates = best[k - 1][:, None] + cost  # [j, n]: k-1 segments over 0..j, then [j, n)
        split[k] = np.argmin(candidates, axis=0)  # the first minimum: the earliest split wins ties
        best[k] = candidates[split[k], np.arange(n + 1)]
    return best, split


def _backtrack(split: np.ndarray, k: int, n: int) -> tuple[tuple[int, int], ...]:
    bounds, end = [], n
    for level in range(k, 1, -1):
        start = int(split[level, end])
        bounds.append((start, end))
        end = start
    bounds.append((0, end))
    return tuple(reversed(bounds))


def segment(values, k: int) -> Segmentation:
    """The optimal split of the sequence ``values`` (L vectors, or L scalars) into ``k`` contiguous segments."""
    best, split = _table(values, k)
    n = best.shape[1] - 1
    return Segmentation(_backtrack(split, k, n), float(best[k, n]))


def losses(values, k_max: int) -> list[float]:
    """P(k, L) for k = 1..k_max, from one table (non-increasing in k)."""
    best, _ = _table(values, k_max)
    return [float(v) for v in best[1:, -1]]


def elbow(curve: list[float]) -> int:
    """The K (1-based) at the elbow of a loss curve over K = 1..len(curve): the point farthest below the chord from
    K = 1 to K = Kmax once both axes are scaled to [0, 1] (x = (K-1)/(Kmax-1), y = (P(K) - P(Kmax)) / (P(1) -
    P(Kmax))), i.e. the K maximising 1 - x - y. The smallest such K on a tie (within 1e-9); 1 when no point lies below
    the chord, the curve is flat, or it has fewer than three points."""
    y = np.asarray(curve, dtype=np.float64)
    if len(y) < 3 or not y[0] - y[-1] > 1e-12 * max(abs(y[0]), 1.0):
        return 1
    x = np.arange(len(y)) / (len(y) - 1)
    distance = 1.0 - x - (y - y[-1]) / (y[0] - y[-1])
    if distance.max() <= 1e-9:  # nothing below the chord (a straight or concave curve)
        return 1
    return int(np.flatnonzero(distance >= distance.max() - 1e-9)[0]) + 1


def k_max_default(layers: int) -> int:
    """The largest K the automatic choice considers: min(L, 10)."""
    return min(layers, 10)


def choose(values, k: int | None = None) -> tuple[Segmentation, list[float]]:
    """(segmentation, loss curve): into ``k`` segments, or, with ``k`` None, into the elbow K of the loss curve
    over K = 1..``k_max_default(L)``. The curve is returned either way (up to max(k, that K max))."""
    n = len(_vectors(values))
    k_max = max(k or 1, k_max_default(n))
    if k is not None and not 1 <= k <= n:
        raise ValueError(f"the number of segments must lie in 1..{n}, not {k}")
    best, split = _table(values, k_max)
    curve = [float(v) for v in best[1:, -1]]
    chosen = k if k is not None else elbow(curve)
    return Segmentation(_backtrack(split, chosen, n), curve[chosen - 1]), curve
