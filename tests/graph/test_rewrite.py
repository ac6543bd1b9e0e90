"""Merging conv runs in ONNX graphs: float32 onnxruntime output against a float64 reference of the
original graph, equal in the interior to 1e-5 relative, with differences only in the border band."""

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.plan import Plan, PlanError, apply_plan
from onnxprune.verify import verify
from tests.builders import GraphBuilder
from tests.conftest import run


def reference_float64(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run a graph of Conv / BatchNormalization / Relu / Add in torch float64."""
    weights = {t.name: torch.tensor(numpy_helper.to_array(t), dtype=torch.float64) for t in model.graph.initializer}
    values = {model.graph.input[0].name: torch.tensor(x, dtype=torch.float64)}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ins = [values.get(n, weights.get(n)) for n in node.input]
        if node.op_type == "Conv":
            p = attrs.get("pads", [0, 0, 0, 0])
            y = F.conv2d(F.pad(ins[0], (p[1], p[3], p[0], p[2])), ins[1], ins[2] if len(ins) > 2 else None,
                         stride=attrs.get("strides", 1), groups=attrs.get("group", 1))
        elif node.op_type == "BatchNormalization":
            y = F.batch_norm(ins[0], ins[3], ins[4], ins[1], ins[2], eps=attrs.get("epsilon", 1e-5))
        elif node.op_type == "Relu":
            y = torch.relu(ins[0])
        elif node.op_type == "Add":
            y = ins[0] + ins[1]
        else:
            raise NotImplementedError(node.op_type)
        values[node.output[0]] = y
    return values[model.graph.output[0].name].numpy()


@st.composite
def chains(draw):
    channels = draw(st.sampled_from([4, 8]))
    depthwise_all = draw(st.booleans())
    specs, strided = [], False
    for _ in range(draw(st.integers(2, 4))):
        k = 1 if strided else draw(st.sampled_from([1, 3, 5]))
        stride = 1 if strided else draw(st.sampled_from([1, 1, 2]))
        strided = strided or stride == 2
        depthwise = depthwise_all or (k > 1 and draw(st.booleans()))
        specs.append(dict(k=k, stride=stride, depthwise=depthwise, bias=draw(st.booleans()), bn=draw(st.booleans()),
                          cout=channels if depthwise else draw(st.sampled_from([channels, 2 * channels]))))
        channels = specs[-1]["cout"]
    return specs, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(chains())
def test_merged_run_equals_the_sequence_in_the_interior(case):
    specs, seed = case
    g = GraphBuilder(("batch", 4, 20, 20), seed=seed)
    g.channels[g.input] = 4
    x = g.relu(g.conv(g.input, 4))  # a stem, so the run starts after an activation
    first_in = 4
    for spec in specs:
        cin = g.channels[x]
        x = g.conv(x, spec["cout"] if not spec["depthwise"] else cin, k=spec["k"], stride=spec["stride"],
                   groups=cin if spec["depthwise"] else 1, bias=spec["bias"])
        if spec["bn"]:
            x = g.bn(x)
    model = infer_shapes(g.build([x]))
    s = analyze_model(model)
    run_names = [c.name for c in s.convs[1:]]
    merged, summary = apply_plan(model, Plan(merge=[run_names]))
    (conv,) = [n for n in merged.graph.node if n.op_type == "Conv" and "merged" in n.name]
    assert summary["merged"][0]["groups"] == (first_in if all(sp["depthwise"] for sp in specs) else 1)
    total_stride = math.prod(sp["stride"] for sp in specs)
    if total_stride == 1:
        assert summary["merged"][0]["kernel"] == [1 + sum(sp["k"] - 1 for sp in specs)] * 2
    feed = np.random.default_rng(seed).normal(size=(2, 4, 20, 20)).astype(np.float32)
    reference = reference_float64(model, feed)
    out = run(merged, {"input": feed})[0]
    assert out.shape == reference.shape
    band = math.ceil(sum(sp["k"] // 2 for sp in specs[1:]) / total_stride)
    h, w = out.shape[2:]
    interior = (slice(None), slice(None), slice(band, h - band), slice(band, w - band))
    scale = np.abs(reference).max()
    assert np.abs(out[interior] - reference[interior]).max() <= 1e-5 * scale
    assert verify(model, merged).passed
    assert summary["changes_function"] == (band > 0)  # padded convs after the first: a border band differs
    if band == 0:
        assert verify(model, merged, preserves_function=True).within_tolerance


def test_merge_refuses_a_conv_after_a_strided_one_that_is_not_1x1():
    g = GraphBuilder(("batch", 4, 16, 16))
    x = g.relu(g.conv(g.input, 4))
    model = infer_shapes(g.build([g.conv(g.conv(x, 4, stride=2), 4, k=3)]))
    s = analyze_model(model)
    with pytest.raises(PlanError, match="only 1x1 convs may follow the strided conv"):
        apply_plan(model, Plan(merge=[[c.name for c in s.convs[1:]]]))


def test_merge_refuses_a_tensor_read_outside_the_run():
    g = GraphBuilder(("batch", 4, 8, 8))
    x = g.relu(g.conv(g.input, 4))
    a = g.conv(x, 4)
    y = g.add(g.conv(a, 4), g.conv(a, 4, k=1))  # a is read by a conv outside the run too
    model = infer_shapes(g.build([y]))
    s = analyze_model(model)
    with pytest.raises(PlanError):
        apply_plan(model, Plan(merge=[[s.convs[1].name, s.convs[2].name]]))
