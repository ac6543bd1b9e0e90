"""Ridge fits from running sums: exact recovery on linear data, errors read from the sums equal the
residuals computed directly, and the ridge pulls towards the identity (plain removal)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.repair.fit import RidgeSums, channel_rows, solve


def _sums(x: np.ndarray, y: np.ndarray, chunks: int = 3) -> RidgeSums:
    sums = RidgeSums(x.shape[1], y.shape[1])
    for part in np.array_split(np.arange(len(x)), chunks):
        sums.add(x[part], y[part])
    return sums


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), e=st.integers(1, 12), n=st.integers(40, 200), seed=st.integers(0, 10_000))
def test_a_map_on_exactly_linear_data_is_recovered(d, e, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d) + rng.normal(size=d)
    m, c = rng.normal(size=(d, e)), rng.normal(size=e)
    fitted = solve(_sums(x, x @ m + c), ridge=0.0)
    np.testing.assert_allclose(fitted.weight, m, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fitted.bias, c, atol=1e-4, rtol=1e-4)
    assert fitted.error_after < 1e-8
    assert fitted.rows == n


@pytest.mark.parametrize("d,e", [(6, 6), (6, 4)])
def test_the_errors_read_from_the_sums_equal_the_residuals(d, e):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, d))
    y = np.tanh(x @ rng.normal(size=(d, e))) + 0.1 * rng.normal(size=(500, e))
    fitted = solve(_sums(x, y), ridge=0.05)
    scale = np.sum((y - y.mean(0)) ** 2)
    before = np.sum((y - x) ** 2) if d == e else np.sum(y ** 2)
    after = np.sum((y - (x @ fitted.weight.astype(np.float64) + fitted.bias)) ** 2)
    assert fitted.error_before == pytest.approx(before / scale, rel=1e-9)
    assert fitted.error_after == pytest.approx(after / scale, rel=1e-4)
    assert fitted.error_after < fitted.error_before


def test_a_large_ridge_gives_the_identity_plus_the_mean_shift():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5))
    y = x @ rng.normal(size=(5, 5)) + 3.0
    fitted = solve(_sums(x, y), ridge=1e9)
    np.testing.assert_allclose(fitted.weight, np.eye(5), atol=1e-6)
    np.testing.assert_allclose(fitted.bias, (y - x).mean(0), atol=1e-5)


def test_no_rows_is_an_error():
    with pytest.raises(ValueError, match="no rows"):
        solve(RidgeSums(3, 3))


def test_channel_rows_put_the_channel_axis_last():
    t = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    rows = channel_rows(t, 1)
    assert rows.shape == (40, 3)
    np.testing.assert_array_equal(rows[0], t[0, :, 0, 0])
    assert channel_rows(np.zeros((2, 7, 9)), 2).shape == (14, 9)
