import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.similarity.cka import StreamingCKA, cka, cka_feature, cka_gram


def reps(seed, n=40, p=12, q=9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    y = np.tanh(x @ rng.normal(size=(p, q))) + 0.5 * rng.normal(size=(n, q))
    return x, y


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_invariances(seed):
    x, y = reps(seed)
    rng = np.random.default_rng(seed + 1)
    q, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert cka(x, 3.7 * x + rng.normal(size=x.shape[1])) == pytest.approx(1.0, abs=1e-10)
    assert cka(x, y) == pytest.approx(cka(y, x), abs=1e-12)
    assert 0.0 <= cka(x, y) <= 1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(5, 60), st.integers(1, 30))
def test_feature_form_equals_gram_form(seed, n, p):
    x, y = reps(seed, n=n, p=p, q=max(1, p // 2))
    assert cka_feature(x, y) == pytest.approx(cka_gram(x, y), abs=1e-10)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 17), min_size=1, max_size=6))
def test_streaming_equals_one_shot(seed, batch_sizes):
    x, y = reps(seed, n=sum(batch_sizes))
    x = x * 1e3 + 50  # scale and offset must not matter
    stream = StreamingCKA()
    start = 0
    for b in batch_sizes:
        stream.update(x[start:start + b], y[start:start + b])
        start += b
    assert stream.value() == pytest.approx(cka(x, y), abs=1e-10)


def test_biased_estimator_is_inflated_and_the_unbiased_one_is_not():
    """Independent Gaussian features (true CKA 0), p = 8: the plain estimator reads about 0.2 at n = 32, 0.03 at n = 256."""
    rng = np.random.default_rng(0)
    for n, low, high in ((32, 0.14, 0.26), (256, 0.02, 0.045)):
        pairs = [(rng.normal(size=(n, 8)), rng.normal(size=(n, 8))) for _ in range(30)]
        assert low < np.mean([cka(x, y) for x, y in pairs]) < high
        assert abs(np.mean([cka(x, y, unbiased=True) for x, y in pairs])) < 0.02
    pairs = [(rng.normal(size=(32, 2000)), rng.normal(size=(32, 2000))) for _ in range(10)]  # p >> n
    assert np.mean([cka(x, y) for x, y in pairs]) > 0.9  # the plain estimator reads ~1
    assert abs(np.mean([cka(x, y, unbiased=True) for x, y in pairs])) < 0.06


def test_streaming_unbiased_matches_minibatch_definition():
    x, y = reps(3, n=64, p=20, q=20)
    stream = StreamingCKA(unbiased=True)
    for i in range(0, 64, 16):
        stream.update(x[i:i + 16], y[i:i + 16])
    assert 0.0 < stream.value() <= 1.0 + 1e-9
    assert stream.value() == pytest.approx(cka(x, y, unbiased=True), abs=0.15)


def test_never_nan():
    zeros, ones = np.zeros((10, 4)), np.ones((10, 4))
    x = np.random.default_rng(0).normal(size=(10, 4))
    for a, b in ((zeros, x), (ones, x), (zeros, zeros)):
        for unbiased in (False, True):
            value = cka(a, b, unbiased=unbiased)
            assert np.isfinite(value) and value == 0.0
    stream = StreamingCKA()
    stream.update(zeros, x)
    assert stream.value() == 0.0
