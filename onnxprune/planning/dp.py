"""The LayerMerge dynamic program (Kim et al., ICML 2024, section 4; docs/algorithms.md section 4).

Positions 0..P; a row (start, end, latency, importance) covers (start, end]. A solution tiles
0..P with rows, maximising summed importance subject to summed latency <= budget:

    D[0][t] = 0 for t >= 0;   D[e][t] = max over rows (s, e) with g <= t of D[s][t - g] + h

Latencies are rounded UP to integer units (g = ceil(latency / unit)), so the float sum of the
chosen rows never exceeds the budget (the public code floors, and overshoots). Exact, with
back-pointers. One table answers every budget up to the largest: ``pareto`` reads the whole
trade-off curve from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxprune.progress import progress


@dataclass(frozen=True)
class Row:
    start: int
    end: int
    latency: float
    importance: float
    key: object = None  # what the caller needs to turn the row back into a change


@dataclass(frozen=True)
class Solution:
    rows: tuple[Row, ...]
    latency: float  # float sum of the chosen rows' latencies
    importance: float
    budget: float


class Infeasible(ValueError):
    """No tiling fits the budget."""


def _units(rows: Sequence[Row], unit: float) -> np.ndarray:
    # A tiny relative slack keeps float noise (0.1 + 0.2) from adding a unit; it can only round down
    # latencies that sit within 1e-9 of a unit boundary, by less than 1e-9 of a unit.
    return np.array([max(0, math.ceil(r.latency / unit - 1e-9)) for r in rows], dtype=np.int64)


def _table(rows: Sequence[Row], positions: int, t_max: int, unit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = _units(rows, unit)
    best = np.full((positions + 1, t_max + 1), -np.inf)
    best[0, :] = 0.0
    choice = np.full((positions + 1, t_max + 1), -1, dtype=np.int64)
    by_end: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if not 0 <= r.start < r.end <= positions:
            raise ValueError(f"row {r} lies outside positions 0..{positions}")
        by_end.setdefault(r.end, []).append(i)
    for e in range(1, positions + 1):
        for i in by_end.get(e, []):
            gi = int(g[i])
            if gi > t_max:
                continue
            candidate = best[rows[i].start, : t_max + 1 - gi] + rows[i].importance
            target = best[e, gi:]
            better = candidate > target  # strict: earlier rows win ties
            target[better] = candidate[better]
            choice[e, gi:][better] = i
    return best, choice, g


def _backtrack(rows: Sequence[Row], choice: np.ndarray, g: np.ndarray, positions: int, t: int) -> tuple[Row, ...]:
    chosen, e = [], positions
    while e > 0:
        i = int(choice[e, t])
        chosen.append(rows[i])
        t -= int(g[i])
        e = rows[i].start
    return tuple(reversed(chosen))


def solve(rows: Sequence[Row], positions: int, budget: float, unit: float) -> Solution:
    """The most important tiling of 0..``positions`` whose latency is at most ``budget``."""
    if unit <= 0:
        raise ValueError("the latency unit must be positive")
    t_max = int(math.floor(budget / unit + 1e-9))
    if t_max < 0:
        raise Infeasible(f"budget {budget} is negative")
    best, choice, g = _table(rows, positions, t_max, unit)
    if not np.isfinite(best[positions, t_max]):
        raise Infeasible(f"no combination of rows fits a latency budget of {budget:.6g}")
    chosen = _backtrack(rows, choice, g, positions, t_max)
    return Solution(chosen, sum(r.latency for r in chosen), sum(r.importance for r in chosen), budget)


def pareto(rows: Sequence[Row], positions: int, max_budget: float, unit: float) -> list[Solution]:
    """Every distinct optimum for budgets 0..max_budget, from one table (the trade-off curve), without the
    optima that another of higher importance beats in float latency too: rounding up can make a solution
    cost more units than one with less float latency, and such a point would make the curve go back."""
    t_max = int(math.floor(max_budget / unit + 1e-9))
    best, choice, g = _table(rows, positions, t_max, unit)
    curve, last = [], -np.inf
    for t in progress(range(t_max + 1), desc="trade-off curve"):
        if np.isfinite(best[positions, t]) and best[positions, t] > last:
            last = best[positions, t]
            chosen = _backtrack(rows, choice, g, positions, t)
            curve.append(Solution(chosen, sum(r.latency for r in chosen), sum(r.importance for r in chosen), t * unit))
    kept, fastest_after = [], math.inf  # from the most important point down: keep what is faster than all after it
    for point in reversed(curve):
        if point.latency < fastest_after:
            kept.append(point)
            fastest_after = point.latency
    return kept[::-1]


def fastest(rows: Sequence[Row], positions: int) -> float:
    """The smallest summed latency of any tiling of 0..positions, importance ignored (what the budget can reach):

        F[0] = 0;   F[e] = min over rows (s, e) of F[s] + latency

    ``inf`` when no tiling exists."""
    best = np.full(positions + 1, np.inf)
    best[0] = 0.0
    for row in sorted(rows, key=lambda r: r.end):
        best[row.end] = min(best[row.end], best[row.start] + row.latency)
    return float(best[positions])
