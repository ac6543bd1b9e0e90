import math

import pytest
from hypothesis import example, given, settings, strategies as st

from onnxprune.planning.dp import Infeasible, Row, fastest, pareto, solve


def tilings(rows, positions):
    """Every tiling of 0..positions by rows (brute force)."""
    by_start = {}
    for r in rows:
        by_start.setdefault(r.start, []).append(r)

    def extend(pos):
        if pos == positions:
            yield ()
            return
        for r in by_start.get(pos, []):
            for rest in extend(r.end):
                yield (r,) + rest

    return list(extend(0))


@st.composite
def instances(draw):
    positions = draw(st.integers(1, 12))
    spans = draw(st.lists(st.tuples(st.integers(0, positions - 1), st.integers(1, 4)), max_size=3))
    spans = [(a, min(positions, a + w)) for a, w in spans]
    rows = []
    for s in range(positions):
        rows.append(Row(s, s + 1, draw(st.floats(0.5, 10)), 0.0, ("keep", s)))  # the original conv
        for e in range(s + 1, min(positions, s + 5) + 1):
            # laminar with the residual spans, as the candidate enumeration guarantees
            if any(not (e <= a or b <= s or (a <= s and e <= b) or (s <= a and b <= e)) for a, b in spans):
                continue
            for k in range(draw(st.integers(0, 2))):
                rows.append(Row(s, e, draw(st.floats(0.0, 12)), -draw(st.floats(0.0, 3)), ("merge", s, e, k)))
    return positions, rows, draw(st.floats(0.1, 1.0))


def assert_solves_like_brute_force(rows, positions: int, budget: float, unit: float, everything):
    """``solve`` finds the best importance among the tilings ``everything`` that fit the budget in latency units,
    raises Infeasible when none does, and never exceeds the budget in float seconds. Returns the solution (None
    when infeasible)."""
    g = {r: math.ceil(r.latency / unit - 1e-9) for r in rows}
    t = math.floor(budget / unit + 1e-9)
    feasible = [tl for tl in everything if sum(g[r] for r in tl) <= t]
    if not feasible:
        with pytest.raises(Infeasible):
            solve(rows, positions, budget, unit)
        return None
    solution = solve(rows, positions, budget, unit)
    assert solution.importance == pytest.approx(max(sum(r.importance for r in tl) for tl in feasible), abs=1e-9)
    assert solution.latency <= budget + 1e-9  # the float sum never exceeds the budget
    return solution


@settings(max_examples=150, deadline=None)
@given(instances(), st.floats(0.2, 1.2))
def test_dp_equals_brute_force_and_never_overshoots(instance, budget_fraction):
    positions, rows, unit = instance
    everything = tilings(rows, positions)
    original = sum(r.latency for r in rows if r.key[0] == "keep")
    budget = budget_fraction * original
    solution = assert_solves_like_brute_force(rows, positions, budget, unit, everything)
    if solution is None:
        return
    assert [r.start for r in solution.rows][0] == 0 and solution.rows[-1].end == positions
    assert all(a.end == b.start for a, b in zip(solution.rows, solution.rows[1:]))


@settings(max_examples=50, deadline=None)
@given(instances())
def test_a_budget_at_the_original_latency_in_units_keeps_the_original(instance):
    positions, rows, unit = instance
    keep = [r for r in rows if r.key[0] == "keep"]
    budget = sum(math.ceil(r.latency / unit - 1e-9) for r in keep) * unit
    solution = solve(rows, positions, budget, unit)
    assert solution.importance == 0.0
    assert all(r.key[0] == "keep" or r.importance == 0.0 for r in solution.rows)


@settings(max_examples=30, deadline=None)
@given(instances())
# a unit coarser than a row: rounding up makes the original 2 units, more than 1.5x its float latency
@example((1, [Row(0, 1, 1.0, 0.0, ("keep", 0))], 0.875))
# the merge rounds up to 3 units and the original to 4, though the merge has more float latency (1.04 > 1.02)
@example((2, [Row(0, 1, 0.51, 0.0, ("keep", 0)), Row(1, 2, 0.51, 0.0, ("keep", 1)), Row(0, 2, 1.04, -0.2, ("merge",))],
          0.5))
def test_pareto_curve_is_monotone_and_matches_single_solves(instance):
    positions, rows, unit = instance
    original = sum(r.latency for r in rows if r.key[0] == "keep")
    # rounding up adds under one unit per position, so this reaches the original (as speedup.py sweeps)
    curve = pareto(rows, positions, original + positions * unit, unit)
    assert curve
    assert curve[-1].importance == 0.0  # the top of the curve keeps the original's importance
    for a, b in zip(curve, curve[1:]):
        assert a.importance < b.importance and a.budget < b.budget and a.latency < b.latency
    for point in curve:
        assert solve(rows, positions, point.budget, unit).importance == pytest.approx(point.importance)


def test_four_hundred_rows_and_thousands_of_units_solve_quickly_enough_to_sweep():
    rows = [Row(s, e, 1.0 + (s * 7 + e * 3) % 11, -((s + 2 * e) % 5) / 10, None)
            for s in range(80) for e in range(s + 1, min(81, s + 6))]
    assert len(rows) == 400 - 10
    solution = solve(rows, 80, budget=300.0, unit=0.1)  # 3,000 units
    assert solution.latency <= 300.0


@settings(max_examples=100, deadline=None)
@given(instances())
def test_fastest_is_the_smallest_latency_of_any_tiling(instance):
    positions, rows, _ = instance
    best = min(sum(r.latency for r in t) for t in tilings(rows, positions))
    assert fastest(rows, positions) == pytest.approx(best)
    assert fastest([r for r in rows if r.start != 0], positions) == math.inf  # nothing starts at 0: no tiling
