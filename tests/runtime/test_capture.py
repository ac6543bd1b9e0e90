import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.graph.io import infer_shapes
from onnxprune.runtime.capture import capture_batch, feature_tensor, suffix_model, with_outputs
from tests.builders import GraphBuilder, residual_block
from tests.conftest import run


def residual_net(seed: int, blocks: int, projection_at: int | None):
    g = GraphBuilder(("N", 3, 8, 8), seed=seed)
    x = g.relu(g.conv(g.input, 4))
    for k in range(blocks):
        x = residual_block(g, x, projection=k == projection_at, stride=2 if k == projection_at else 1,
                           cout=8 if k == projection_at else None)
    return infer_shapes(g.build([x]))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), blocks=st.integers(1, 4), projection=st.integers(-1, 3), pick=st.integers(0, 10_000))
def test_a_suffix_fed_with_captured_tensors_reproduces_the_whole_network(seed, blocks, projection, pick):
    model = residual_net(seed, blocks, projection if projection < blocks else None)
    output = model.graph.output[0].name
    starts = [n.output[0] for n in model.graph.node if n.output[0] != output]
    start = starts[pick % len(starts)]
    suffix, side = suffix_model(model, start, [output])
    x = np.random.default_rng(seed).normal(size=(2, 3, 8, 8)).astype(np.float32)
    captured = dict(zip([output, start, *side], run(with_outputs(model, [start, *side]), {"input": x})))
    got = run(suffix, {start: captured[start], **{t: captured[t] for t in side}})[0]
    np.testing.assert_allclose(got, captured[output], rtol=1e-5, atol=1e-5)
    assert len(suffix.graph.node) < len(model.graph.node)


def test_with_outputs_keeps_the_original_outputs_first_and_adds_each_name_once():
    model = residual_net(0, 2, None)
    inner = [model.graph.node[0].output[0], model.graph.node[2].output[0]]
    extended = with_outputs(model, inner + inner[:1] + [model.graph.output[0].name])
    assert [o.name for o in extended.graph.output] == [model.graph.output[0].name, *inner]
    assert len(model.graph.output) == 1  # the original is left alone


def test_suffix_refuses_an_output_not_computed_from_the_start():
    model = residual_net(0, 2, None)
    last = model.graph.output[0].name
    with pytest.raises(ValueError, match="not computed from"):
        suffix_model(model, last, [model.graph.node[0].output[0]])


def test_capture_batch_stays_within_the_memory_budget():
    model = residual_net(0, 1, None)
    name = model.graph.node[0].output[0]  # 4 x 8 x 8 floats = 1 KiB per sample
    assert capture_batch(model, [name], 64) == 64
    assert capture_batch(model, [name, name], 64, budget_bytes=16 * 1024) == 16  # counted once
    assert capture_batch(model, [name], 64, budget_bytes=100) == 1


def test_without_a_classifier_the_output_is_the_feature():
    """A model whose output is a map (a detector's head, no Gemm/MatMul on the way) is scored at its output."""
    model = residual_net(0, 1, None)
    assert feature_tensor(model) == model.graph.output[0].name
