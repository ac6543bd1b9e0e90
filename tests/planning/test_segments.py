import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.planning.segments import choose, diameters, elbow, losses, segment


def within(a: np.ndarray, bounds) -> float:
    return float(sum(((a[s:e] - a[s:e].mean(axis=0)) ** 2).sum() for s, e in bounds))


def brute_force(a: np.ndarray, k: int) -> float:
    n = len(a)
    return min(within(a, list(zip((0, *cuts), (*cuts, n)))) for cuts in itertools.combinations(range(1, n), k - 1))


sequences = st.integers(1, 10).flatmap(lambda n: st.integers(1, 3).flatmap(
    lambda d: st.lists(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=d, max_size=d),
                       min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(sequences)
def test_the_dp_equals_brute_force_for_every_k(values):
    a = np.asarray(values, dtype=np.float64)
    curve = losses(a, len(a))
    for k in range(1, len(a) + 1):
        result = segment(a, k)
        assert len(result.bounds) == k and result.bounds[0][0] == 0 and result.bounds[-1][1] == len(a)
        assert all(s < e for s, e in result.bounds)
        assert all(e == s2 for (_, e), (s2, _) in zip(result.bounds, result.bounds[1:]))
        expected = brute_force(a, k)
        assert result.loss == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert within(a, result.bounds) == pytest.approx(expected, rel=1e-9, abs=1e-9)  # the bounds achieve it
        assert curve[k - 1] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert all(x >= y - 1e-9 for x, y in zip(curve, curve[1:]))


def test_diameters_from_prefix_sums():
    a = np.random.default_rng(0).normal(size=(6, 3))
    table = diameters(a)
    for i in range(6):
        for j in range(i + 1, 7):
            assert table[i, j] == pytest.approx(within(a, [(i, j)]))
    assert np.isinf(table[3, 3]) and np.isinf(table[4, 2])


def test_scalars_and_three_clear_groups():
    a = [0.0, 0.1, 0.0, 5.0, 5.1, 5.0, 5.1, 9.0, 9.2]
    assert segment(a, 3).bounds == ((0, 3), (3, 7), (7, 9))
    chosen, curve = choose(a)
    assert chosen.bounds == ((0, 3), (3, 7), (7, 9)) and len(curve) == 9  # the elbow finds the three groups
    assert chosen.segment_of(5) == 1 and chosen.starts == (0, 3, 7)
    assert choose(a, 2)[0].bounds == segment(a, 2).bounds
    with pytest.raises(ValueError):
        segment(a, 10)


def test_elbow_rule():
    assert elbow([10, 4, 3, 2.5, 2.2]) == 2  # farthest below the chord from K=1 to K=5
    assert elbow([10, 9, 8, 7]) == 1  # a straight line: nothing below the chord, the smallest K
    assert elbow([3, 3, 3]) == 1 and elbow([5, 1]) == 1
    assert elbow([10, 9.9, 1, 0.9, 0.8]) == 3
