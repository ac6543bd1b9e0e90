import numpy as np
import pytest
from onnx import numpy_helper

from onnxprune.data.sources import Dataset
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.speedup import normalized
from onnxprune.train.gradnorm import grad_norms
from tests.builders import GraphBuilder
from tests.conftest import run


def tiny(seed=0):
    """stem 1x1 conv, two identity blocks x + conv(tanh(conv(x))) of 3 channels, GAP, Gemm to 4 classes. Smooth
    (tanh, not ReLU), so that central differences in float32 converge to the gradient."""
    g = GraphBuilder(("batch", 2, 4, 4), seed=seed)
    x = g.node("Tanh", [g.conv(g.input, 3, k=1)])
    for _ in range(2):
        x = g.add(x, g.conv(g.node("Tanh", [g.conv(x, 3)]), 3))
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], 3)
    w = g.const(g.rng.normal(size=(4, 3)).astype(np.float32))
    return infer_shapes(g.build([g.node("Gemm", [pooled, w, g.const(np.zeros(4, np.float32))], 4, transB=1)]))


def cross_entropy(model, x, y):
    logits = run(model, {"input": x})[0].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]))


def finite_difference_norm(model, names, x, y, eps=1e-2):
    """|| d CE / d theta || over the named initializers, by central differences (onnxruntime, float32)."""
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    squares = 0.0
    for name in names:
        proto = model.graph.initializer[inits[name]]
        value = numpy_helper.to_array(proto).astype(np.float32)
        for k in range(value.size):
            losses = []
            for step in (eps, -eps):
                changed = value.copy().reshape(-1)
                changed[k] += step
                proto.CopyFrom(numpy_helper.from_array(changed.reshape(value.shape), name))
                losses.append(cross_entropy(model, x, y))
            squares += ((losses[0] - losses[1]) / (2 * eps)) ** 2
        proto.CopyFrom(numpy_helper.from_array(value, name))
    return squares ** 0.5


def test_gradnorm_matches_finite_differences_with_labels_and_pseudo_labels():
    model = normalized(tiny())
    blocks = analyze_model(model).residual_blocks
    assert len(blocks) == 2
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=12)
    data = Dataset({"input": x}, y, "test", False)
    result = grad_norms(model, blocks, data, batch=6)  # two batches of 6: each batch's norm, summed
    assert result.batches == 2 and result.samples == 12 and result.labels == "labels"
    for b in blocks:
        assert len(result.parameters[b.join]) == 4  # two convs, weight and bias each
        expected = sum(finite_difference_norm(model, result.parameters[b.join], x[s:s + 6], y[s:s + 6])
                       for s in (0, 6))
        assert result.norms[b.join] == pytest.approx(expected, rel=1e-3)

    pseudo = grad_norms(model, blocks, Dataset({"input": x}, None, "test", False), batch=12)
    argmax = run(model, {"input": x})[0].argmax(axis=1)
    assert pseudo.labels == "pseudo-labels"
    for b in blocks:
        expected = finite_difference_norm(model, pseudo.parameters[b.join], x, argmax)
        assert pseudo.norms[b.join] == pytest.approx(expected, rel=1e-3) and expected > 0
    ignored = grad_norms(model, blocks, data, batch=12, use_labels=False)  # labels present but not used
    assert ignored.labels == "pseudo-labels" and ignored.norms == pytest.approx(pseudo.norms, rel=1e-6)
