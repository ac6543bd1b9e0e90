import numpy as np
import pytest

from onnxprune.data.sources import load_data
from onnxprune.graph.analysis import analyze_model
from onnxprune.runtime.capture import with_outputs
from onnxprune.similarity.cka import StreamingCKA, cka
from onnxprune.similarity.matrix import MinibatchCKA, block_layers, layer_cka
from tests.conftest import run
from tests.importance.test_slp import classifier


def test_minibatch_matrix_equals_pairwise_unbiased_cka_batch_by_batch():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 30))
    reps = [base, base @ rng.normal(size=(30, 30)), rng.normal(size=(40, 50)), 3 * base + 1]
    acc = MinibatchCKA(len(reps))
    reference = [[StreamingCKA(unbiased=True) for _ in reps] for _ in reps]
    for start in range(0, 40, 16):  # batches of 16, 16 and 8
        acc.update([r[start:start + 16] for r in reps])
        for i, x in enumerate(reps):
            for j, y in enumerate(reps):
                reference[i][j].update(x[start:start + 16], y[start:start + 16])
    m = acc.value()
    expected = np.array([[c.value() for c in row] for row in reference])
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(m, expected, atol=1e-9)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    assert m[0, 3] == pytest.approx(1.0) and abs(m[0, 2]) < 0.4 and acc.samples == 40
    single = MinibatchCKA(2)
    single.update([base, reps[1]])
    assert single.value()[0, 1] == pytest.approx(cka(base, reps[1], unbiased=True))


def test_batches_under_four_samples_are_left_out():
    acc = MinibatchCKA(2)
    acc.update([np.ones((3, 4)), np.ones((3, 4))])
    assert acc.samples == 0


def test_layer_cka_on_a_small_resnet():
    model = classifier(seed=3)
    structure = analyze_model(model)
    data = load_data("random", model, samples=24, seed=0)
    result = layer_cka(model, structure, data, "cpu", batch=8)
    layers, joins = block_layers(structure)
    assert result.layers == tuple(layers) and joins[0] is None and len(layers) == 1 + len(structure.residual_blocks)
    assert result.cka.shape == (len(layers),) * 2 and result.samples == 24 and result.provider == "cpu"
    np.testing.assert_allclose(np.diag(result.cka), 1.0)
    # the same value as the pairwise estimator on the captured tensors
    feeds = {"input": data.inputs["input"]}
    captured = run(with_outputs(model, layers), feeds)[1:]
    acc = StreamingCKA(unbiased=True)
    for start in range(0, 24, 8):
        acc.update(captured[0][start:start + 8], captured[3][start:start + 8])
    assert result.cka[0, 3] == pytest.approx(acc.value(), abs=1e-6)
