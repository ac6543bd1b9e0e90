import json

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from tests.builders import GraphBuilder, residual_block


def analyze(model: onnx.ModelProto):
    return analyze_model(infer_shapes(model))


def small_resnet(shortcut_first: bool = True):
    g = GraphBuilder(("batch", 3, 16, 16))
    x = g.relu(g.bn(g.conv(g.input, 8, bias=False)))
    x = residual_block(g, x, shortcut_first=shortcut_first)
    x = residual_block(g, x, shortcut_first=not shortcut_first)
    x = residual_block(g, x, projection=True, stride=2, cout=16, shortcut_first=shortcut_first)
    x = residual_block(g, x, shortcut_first=shortcut_first)
    return g.build([x])


@pytest.mark.parametrize("shortcut_first", [True, False])
def test_resnet_blocks_shortcuts_and_removability(shortcut_first):
    s = analyze(small_resnet(shortcut_first))
    kinds = [(b.shortcut, b.removable) for b in s.residual_blocks]
    assert kinds == [("identity", True), ("identity", True), ("projection", False), ("identity", True)]
    assert [b.input_shape for b in s.residual_blocks][0] == ["batch", 8, 16, 16]
    assert all(b.parent is None for b in s.residual_blocks)
    block = s.residual_blocks[0]
    assert len(block.branch_nodes) == 3 and block.shortcut_nodes == []  # conv, relu, conv (BN folded)
    assert len(s.residual_blocks[2].shortcut_nodes) == 1
    assert block.params == 2 * (8 * 8 * 9 + 8)  # two 3x3 convs, BN folded into a bias
    assert block.macs == 2 * 8 * 16 * 16 * 8 * 9


def test_chain_spans_stride_breaks_and_barriers():
    s = analyze(small_resnet())
    assert len(s.convs) == 9 and len(s.shortcut_convs) == 1
    assert [c.activation for c in s.convs] == ["Relu"] * 9
    assert s.stride_breaks == [5]
    assert [(sp["source"], sp["target"]) for sp in s.spans] == [(0, 2), (2, 4), (6, 8)]
    assert [b["position"] for b in s.barriers] == [6]  # the join of the projection block
    assert s.links[1].joins == [] and s.links[2].joins == [0] and s.links[2].activations == ["Relu"]


def test_nested_residuals():
    g = GraphBuilder(("batch", 8, 8, 8))
    x = g.relu(g.conv(g.input, 8))
    inner = residual_block(g, g.relu(g.conv(x, 8)))
    outer = g.add(x, g.conv(inner, 8), name="outer_join")
    s = analyze(g.build([outer]))
    by_join = {b.join: b for b in s.residual_blocks}
    assert set(by_join) == {"outer_join", s.residual_blocks[0].join}
    inner_block = next(b for b in s.residual_blocks if b.join != "outer_join")
    assert inner_block.parent == by_join["outer_join"].index
    assert by_join["outer_join"].removable and inner_block.removable
    assert set(inner_block.branch_nodes) < set(by_join["outer_join"].branch_nodes)


def test_branch_tensor_read_outside_the_block_is_not_removable():
    g = GraphBuilder(("batch", 8, 8, 8))
    x = g.relu(g.conv(g.input, 8))
    inner = g.relu(g.conv(x, 8))
    y = g.add(x, g.conv(inner, 8))
    out = g.node("Concat", [y, inner], 16, axis=1)
    s = analyze(g.build([out]))
    (block,) = s.residual_blocks
    assert block.shortcut == "identity" and not block.removable
    assert "read outside the block" in block.reason


def test_graph_without_residual_blocks_is_analyzed_and_says_so():
    g = GraphBuilder(("batch", 3, 8, 8))
    y = g.relu(g.conv(g.relu(g.conv(g.input, 8)), 8))
    s = analyze(g.build([y]))
    assert s.residual_blocks == [] and len(s.convs) == 2
    assert any("no residual block" in n for n in s.notes)
    json.dumps(s.to_dict())


def test_bias_adds_and_decomposed_layernorm_adds_are_not_joins():
    g = GraphBuilder(("batch", 4, 8, 8))
    x = g.bias_add(g.conv(g.input, 4, bias=False))
    mean = g.node("ReduceMean", [x], axes=[1])
    centered = g.node("Sub", [x, mean])
    var = g.node("ReduceMean", [g.node("Mul", [centered, centered])], axes=[1])
    denom = g.node("Sqrt", [g.node("Add", [var, g.const(np.array(1e-5, np.float32))])])
    normed = g.node("Div", [centered, denom])
    y = g.node("Add", [g.node("Mul", [normed, g.const(np.ones((1, 4, 1, 1), np.float32))]),
                       g.const(np.zeros((1, 4, 1, 1), np.float32))])
    s = analyze(g.build([g.conv(y, 4)]))
    assert s.residual_blocks == []


def test_transformer_style_pre_norm_block_is_an_identity_join():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "bias"], ["mmb"], name="bias_add"),
        helper.make_node("Gelu" if False else "Relu", ["mmb"], ["act"], name="act"),
        helper.make_node("Add", ["x", "act"], ["y"], name="join"),
    ]
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in
             (("g", np.ones(16, np.float32)), ("b", np.zeros(16, np.float32)), ("w", w), ("bias", np.zeros(16, np.float32)))]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", 1, ["batch", 5, 16])],
                              [helper.make_tensor_value_info("y", 1, ["batch", 5, 16])], inits)
    s = analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (block,) = s.residual_blocks
    assert block.join == "join" and block.fork is None and block.shortcut == "identity" and block.removable
    assert block.macs == 5 * 16 * 16 and block.params == 16 * 16 + 3 * 16


def test_broadcasting_join_is_not_removable():
    g = GraphBuilder(("batch", 4, 8, 8))
    x = g.relu(g.conv(g.input, 4))
    pooled = g.node("GlobalAveragePool", [x])
    y = g.add(g.conv(pooled, 4, k=1), x)
    s = analyze(g.build([y]))
    (block,) = s.residual_blocks
    assert block.shortcut == "identity" and block.removable  # x + f(pool(x)) keeps x's shape
    g2 = GraphBuilder(("batch", 4, 8, 8))
    x2 = g2.relu(g2.conv(g2.input, 4))
    y2 = g2.add(g2.node("GlobalAveragePool", [x2]), g2.conv(x2, 4, k=1))
    (block2,) = analyze(g2.build([y2])).residual_blocks
    assert not block2.removable


@pytest.mark.parametrize("make, expected", [
    (lambda g, x: g.node("Clip", [x, g.const(np.array(0, np.float32)), g.const(np.array(6, np.float32))]), "ReLU6"),
    (lambda g, x: g.node("Mul", [x, g.node("Sigmoid", [x])]), "SiLU"),
    (lambda g, x: g.node("Mul", [g.node("Sigmoid", [x]), x]), "SiLU"),
    (lambda g, x: g.node("HardSwish", [x]), "HardSwish"),
    (lambda g, x: g.node("Mul", [x, g.node("HardSigmoid", [x])]), "HardSwish"),
    (lambda g, x: g.node("HardSigmoid", [x]), "HardSigmoid"),
    (lambda g, x: g.node("Sigmoid", [x]), "Sigmoid"),
    (lambda g, x: g.node("Mul", [g.node("Mul", [x, g.node("Add", [g.node("Erf", [g.node("Div", [x, g.const(np.array(1.4142135, np.float32))])]), g.const(np.array(1, np.float32))])]), g.const(np.array(0.5, np.float32))]), "Gelu"),
    (lambda g, x: x, None),
])
def test_activation_after_each_conv(make, expected):
    g = GraphBuilder(("batch", 4, 8, 8))
    y = g.conv(make(g, g.conv(g.input, 4)), 4)
    s = analyze(g.build([y]))
    assert s.convs[0].activation == expected
    assert s.links[0].barrier is None


def f32(v):
    return np.array(v, np.float32)


@pytest.mark.parametrize("make, kind, attrs", [
    (lambda g, x: g.relu(x), "Relu", {}),
    (lambda g, x: g.node("Clip", [x, g.const(f32(0)), g.const(f32(6))]), "ReLU6", {"min": 0.0, "max": 6.0}),
    (lambda g, x: g.node("Clip", [x, g.const(f32(0)), g.const(f32(1))]), "Clip", {"min": 0.0, "max": 1.0}),
    (lambda g, x: g.node("Clip", [x, "", g.const(f32(6))]), "Clip", {"min": None, "max": 6.0}),
    (lambda g, x: g.node("LeakyRelu", [x], alpha=0.2), "LeakyRelu", {"alpha": pytest.approx(0.2)}),
    (lambda g, x: g.node("LeakyRelu", [x]), "LeakyRelu", {"alpha": pytest.approx(0.01)}),
    (lambda g, x: g.node("HardSigmoid", [x], alpha=0.25, beta=0.4), "HardSigmoid",
     {"alpha": pytest.approx(0.25), "beta": pytest.approx(0.4)}),
    (lambda g, x: g.node("Elu", [x], alpha=0.5), "Elu", {"alpha": pytest.approx(0.5)}),
    (lambda g, x: g.node("PRelu", [x, g.const(np.full((4, 1, 1), 0.25, np.float32))]), "PRelu",
     {"slope_shape": [4, 1, 1]}),
    (lambda g, x: g.node("Mul", [x, g.node("Tanh", [g.node("Softplus", [x])])]), "Mish", {}),
    (lambda g, x: g.node("Mul", [x, g.node("Sigmoid", [x])]), "SiLU", {}),
])
def test_activation_attrs_are_read_from_the_activation_nodes(make, kind, attrs):
    g = GraphBuilder(("batch", 4, 8, 8))
    y = g.conv(make(g, g.conv(g.input, 4)), 4)
    s = analyze(g.build([y]))
    assert s.convs[0].activation == kind and s.convs[0].activation_attrs == attrs
    assert s.convs[1].activation is None and s.convs[1].activation_attrs == {}
    json.dumps(s.to_dict(), allow_nan=False)  # attrs are plain JSON


def test_dynamic_batch_blocks_stay_removable():
    g = GraphBuilder(("N", 8, 8, 8))
    y = residual_block(g, g.relu(g.conv(g.input, 8)))
    (block,) = analyze(g.build([y])).residual_blocks
    assert block.removable and block.input_shape[0] == "N"


def test_maxpool_and_squeeze_excite_are_barriers():
    g = GraphBuilder(("batch", 4, 16, 16))
    x = g.node("MaxPool", [g.relu(g.conv(g.input, 8))], kernel_shape=[2, 2], strides=[2, 2])
    x = g.relu(g.conv(x, 8))
    gate = g.node("Sigmoid", [g.conv(g.relu(g.conv(g.node("GlobalAveragePool", [x]), 4, k=1)), 8, k=1)])
    y = g.conv(g.node("Mul", [x, gate]), 8, k=1)
    s = analyze(g.build([y]))
    main = [c.name for c in s.convs]
    assert len(main) == 5
    assert [b["op"] for b in s.barriers][:1] == ["MaxPool"]
    assert any(b["op"] == "Mul" for b in s.barriers)


def test_tf2onnx_style_graph_nhwc_same_padding_identity_shortcuts():
    """What TensorFlow/Keras exporters produce: NHWC input behind a Transpose, SAME padding,
    Identity nodes on shortcuts, unnamed nodes, opset 13."""
    g = GraphBuilder(("unk__1", 16, 16, 3), opset=13)
    g.channels[g.input] = 3
    x = g.node("Transpose", [g.input], 3, perm=[0, 3, 1, 2])
    x = g.node("Clip", [g.conv(x, 8), g.const(np.array(0, np.float32)), g.const(np.array(6, np.float32))])
    for _ in range(2):
        y = g.node("Relu", [g.conv(x, 8)])
        y = g.conv(y, 8)
        x = g.relu(g.add(g.node("Identity", [x]), y))
    out = g.node("Transpose", [x], 8, perm=[0, 2, 3, 1])
    model = g.build([out])
    for node in model.graph.node:
        node.name = ""
        for attr in node.attribute:
            if attr.name == "pads":
                node.attribute.remove(attr)
                node.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
                break
    s = analyze(model)
    assert [(b.shortcut, b.removable) for b in s.residual_blocks] == [("identity", True)] * 2
    assert s.convs[0].activation == "ReLU6" and len(s.convs) == 5
    assert [(sp["source"], sp["target"]) for sp in s.spans] == [(0, 2), (2, 4)]


def two_input_model(bias_first: bool = False) -> onnx.ModelProto:
    """y = x + Relu(x W + b): the bias ``b`` is a second graph input, added inside the branch (as an attention
    mask's bias is added to the scores); z = Relu(x) + b reads the bias outside any block."""
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias_add"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("Add", ["x", "r"], ["y"], name="join"),
             helper.make_node("Relu", ["y"], ["ry"], name="relu_out")]
    inputs = [helper.make_tensor_value_info(name, 1, ["N", 4]) for name in ("x", "b")]
    graph = helper.make_graph(nodes, "two_inputs", inputs[::-1] if bias_first else inputs,
                              [helper.make_tensor_value_info("ry", 1, ["N", 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias_first", [False, True])
def test_a_second_input_added_in_a_branch_is_a_side_input_not_a_join(bias_first):
    """The input most nodes depend on (x) carries the residual stream whatever the input order; b is a side
    input, its Add a bias, and the block reading it has one fork tensor (docs/algorithms.md section 0)."""
    s = analyze(two_input_model(bias_first))
    assert [b.join for b in s.residual_blocks] == ["join"]
    block = s.residual_blocks[0]
    assert block.input == "x" and block.shortcut == "identity" and block.removable, block.reason
    assert block.branch_nodes == ["matmul", "bias_add", "relu"]
    assert "side inputs ['b']" in " ".join(s.notes)


def test_one_input_has_no_side_inputs():
    s = analyze(small_resnet())
    assert not any("side inputs" in note for note in s.notes)
