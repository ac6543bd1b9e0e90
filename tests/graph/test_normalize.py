import numpy as np
import onnx
import onnx_graphsurgeon as gs
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper

from onnxprune.graph.normalize import to_graph, to_model
from tests.builders import GraphBuilder
from tests.conftest import run


@settings(max_examples=15, deadline=None)
@given(k=st.sampled_from([1, 3, 5]), groups_dw=st.booleans(), bias=st.booleans(), seed=st.integers(0, 10_000))
def test_batchnorm_folds_into_conv_exactly(k, groups_dw, bias, seed):
    g = GraphBuilder(("N", 8, 10, 10), seed=seed)
    y = g.relu(g.bn(g.conv(g.input, 8, k=k, groups=8 if groups_dw else 1, bias=bias)))
    model = g.build([y])
    folded = to_model(to_graph(model), model)
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(seed).normal(size=(3, 8, 10, 10)).astype(np.float32)
    ref, out = run(model, {"input": x})[0], run(folded, {"input": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_identity_weights_and_constant_nodes_become_constants():
    w = np.ones((4, 4, 1, 1), np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(w)),
        helper.make_node("Identity", ["w0"], ["w1"]),
        helper.make_node("Conv", ["x", "w1"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = to_graph(model)
    assert [n.op for n in g.nodes] == ["Conv"]
    assert isinstance(g.nodes[0].inputs[1], gs.Constant)


def test_batchnorm_not_folded_when_conv_output_is_read_twice():
    g = GraphBuilder(("N", 4, 6, 6))
    c = g.conv(g.input, 4)
    y = g.add(g.bn(c), c)
    graph = to_graph(g.build([y]))
    assert "BatchNormalization" in [n.op for n in graph.nodes]


def test_unnamed_nodes_get_unique_deterministic_names():
    g = GraphBuilder(("N", 4, 6, 6))
    y = g.relu(g.conv(g.input, 4))
    model = g.build([y])
    for node in model.graph.node:
        node.name = ""
    names = [n.name for n in to_graph(model).nodes]
    assert names == ["Conv_0", "Relu_1"] and names == [n.name for n in to_graph(model).nodes]


def _computed_weight_model() -> onnx.ModelProto:
    """A Conv whose weight is ConstantOfShape * scale and whose bias is Unsqueeze(Add(...)) of
    constants, with a dynamic batch read by Shape for a Reshape after it (old exporters' style)."""
    rng = np.random.default_rng(0)
    fill = {v: numpy_helper.from_array(np.array([v], np.float32)) for v in (0.25, 0.5)}
    scale = rng.uniform(0.5, 1.5, (8, 1, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(rng.normal(size=(1, 8)).astype(np.float32), "b0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["w_shape"], value=numpy_helper.from_array(np.array([8, 4, 3, 3], np.int64))),
        helper.make_node("ConstantOfShape", ["w_shape"], ["w_fill"], value=fill[0.25]),
        helper.make_node("Mul", ["w_fill", "scale"], ["w"]),
        helper.make_node("ConstantOfShape", ["b_shape"], ["b_fill"], value=fill[0.5]),
        helper.make_node("Add", ["b_fill", "b0"], ["b_row"]),
        helper.make_node("Squeeze", ["b_row", "zero_axes"], ["b"]),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["r", "flat_shape"], ["y"]),
    ]
    inits += [numpy_helper.from_array(np.array([1, 8], np.int64), "b_shape"),
              numpy_helper.from_array(np.array([0], np.int64), "zero_axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", 1, ["N", 288])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_weights_computed_from_constants_become_initializers():
    from onnxprune.graph.analysis import analyze_graph
    from onnxprune.graph.io import infer_shapes

    model = infer_shapes(_computed_weight_model())
    graph = to_graph(model)
    assert sorted(n.op for n in graph.nodes) == ["Concat", "Conv", "Gather", "Relu", "Reshape", "Shape", "Unsqueeze"]
    conv = next(n for n in graph.nodes if n.op == "Conv")
    assert all(isinstance(t, gs.Constant) for t in conv.inputs[1:])
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "scale"))
    np.testing.assert_array_equal(conv.inputs[1].values, np.broadcast_to(0.25 * scale, (8, 4, 3, 3)))
    b0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b0"))
    np.testing.assert_array_equal(conv.inputs[2].values, 0.5 + b0[0])
    # the batch stays symbolic: Shape of the input is not a constant
    assert next(t for t in graph.tensors().values() if t.name == "r").shape[0] == "N"
    structure = analyze_graph(graph, model)
    assert [c.name for c in structure.convs] == ["conv"] and structure.convs[0].activation == "Relu"
    assert not any("non-constant" in note for note in structure.notes)
    folded = to_model(to_graph(model), model)
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(1).normal(size=(3, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(folded, {"x": x})[0], run(model, {"x": x})[0])


def test_integer_and_random_constant_subgraphs_stay():
    nodes = [
        helper.make_node("Concat", ["one", "minus_one"], ["shape"], axis=0),  # integer: left alone
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("RandomNormalLike", ["bias0"], ["noise"], seed=1.0),  # random: never frozen
        helper.make_node("Add", ["flat", "noise"], ["y"]),
        helper.make_node("MatMul", ["y", "w"], ["z"]),
    ]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(np.zeros(16, np.float32), "bias0"),
             numpy_helper.from_array(np.ones((16, 2), np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info("z", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert sorted(n.op for n in to_graph(model).nodes) == ["Add", "Concat", "MatMul", "RandomNormalLike", "Reshape"]


def test_a_constant_node_that_fails_to_evaluate_stays_with_what_depends_on_it(monkeypatch):
    from onnxprune.graph import normalize

    real_run = normalize._run

    def failing_mul(node, *args):
        if node.op == "Mul":
            raise RuntimeError("no Mul today")
        return real_run(node, *args)

    monkeypatch.setattr(normalize, "_run", failing_mul)
    model = _computed_weight_model()
    graph = to_graph(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    assert not isinstance(conv.inputs[1], gs.Constant) and isinstance(conv.inputs[2], gs.Constant)
    assert {"ConstantOfShape", "Mul"} <= {n.op for n in graph.nodes}
    x = np.random.default_rng(2).normal(size=(2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(to_model(graph, model), {"x": x})[0], run(model, {"x": x})[0])


def test_a_damaged_conv_or_batchnorm_is_left_unfolded_not_a_crash():
    """Found by the 10,000-case fuzz run: a byte flip turned a node into a Conv with one input, and BN folding read
    its missing weight. A damaged node is left as it is, for the checker to name."""
    scale = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("s", "b", "m", "v")]
    for conv_inputs, bn_inputs in ((["x"], ["c", "s", "b", "m", "v"]), (["x", "w"], ["c", "s", "b"])):
        nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv"),
                 helper.make_node("BatchNormalization", bn_inputs, ["y"], name="bn")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 3, 3])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  scale + [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")])
        folded = to_graph(helper.make_model(graph))
        assert [n.op for n in folded.nodes] == ["Conv", "BatchNormalization"]
