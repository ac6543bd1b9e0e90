import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.graph.io import infer_shapes
from onnxprune.graph.io import load_model
from onnxprune.runtime.capture import (attention_mask_input, capture_batch, feature_rows, feature_tensor, row_width,
                                       suffix_model, with_outputs)
from tests import encoder
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


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_encoder_is_compared_at_its_token_sequence_pooled_under_its_mask(exported_encoder, exporter):
    """No classifier at the output: the feature is the output itself, not an input of the last MLP's MatMul;
    the attention mask is the input that reaches the Softmax, not the token ids (docs/algorithms.md section 9)."""
    _, path = exported_encoder(exporter)
    model = load_model(path)
    assert feature_tensor(model) == "hidden"
    assert attention_mask_input(model) == "attention_mask"
    assert row_width(model, "hidden", tokens=16) == 32 and row_width(model, "hidden") in (32, 16 * 32)


def test_a_classifier_has_no_attention_mask():
    model = residual_net(0, 1, None)
    assert attention_mask_input(model) is None
    assert row_width(model, model.graph.output[0].name, tokens=8) == 4 * 8 * 8  # (N, 4, 8, 8): 4 is no token axis


def test_a_mask_read_by_an_embedding_is_no_attention_mask():
    """Token ids reach the scores too, but through an embedding's Gather: they are not a mask."""
    table = onnx.numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    nodes = [onnx.helper.make_node("Gather", ["ids", "table"], ["e"]),
             onnx.helper.make_node("Cast", ["ids"], ["f"], to=1),
             onnx.helper.make_node("Unsqueeze", ["f", "axis"], ["g"]),
             onnx.helper.make_node("Add", ["e", "g"], ["s"]),
             onnx.helper.make_node("Softmax", ["s"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 5])],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)],
                                   [table, onnx.numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    assert attention_mask_input(onnx.helper.make_model(graph)) is None


def test_token_rows_are_means_over_the_tokens_the_mask_keeps(rng):
    values = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)  # (batch, tokens, ...)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], np.int64)
    rows = feature_rows(values, 3, mask)
    assert rows.shape == (3, 10)
    np.testing.assert_allclose(rows[0], values[0].mean(axis=0).ravel(), rtol=1e-5)
    np.testing.assert_allclose(rows[1], values[1, :2].mean(axis=0).ravel(), rtol=1e-5)
    np.testing.assert_array_equal(rows[2], 0)  # nothing kept: a zero row, never NaN
    padded = values.copy()
    padded[1, 2:] = 1e6  # what the padding holds does not matter
    np.testing.assert_array_equal(feature_rows(padded, 3, mask), rows)
    np.testing.assert_array_equal(feature_rows(values, 2, mask), rows[:2])  # rows after count fill a static batch


def test_without_a_matching_mask_rows_are_flattened(rng):
    values = rng.normal(size=(3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(feature_rows(values, 3), values.reshape(3, -1))
    np.testing.assert_array_equal(feature_rows(values, 3, np.ones((3, 7))), values.reshape(3, -1))  # 7 tokens, not 4
    pooled = values[:, 0]  # (batch, dim): a classifier's input has no token axis
    np.testing.assert_array_equal(feature_rows(pooled, 3, np.ones((3, 5))), pooled)
