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
