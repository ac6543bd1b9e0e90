"""Placing a fitted map: folded into the producing Conv / Gemm / MatMul (+ Add) it equals the same map
inserted as a node of its own, to 1e-5; a map is inserted where another reader needs the unmapped tensor."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph.io import infer_shapes
from onnxprune.repair.cuts import Cut
from onnxprune.repair.fit import AffineMap
from onnxprune.repair.place import place_map
from tests.builders import GraphBuilder
from tests.conftest import run


def _affine(rng, d: int, e: int) -> AffineMap:
    return AffineMap(rng.normal(size=(d, e)).astype(np.float32), rng.normal(size=e).astype(np.float32), 1, 1.0, 0.5)


def _linear_model(kind: str, d: int, e: int, rng) -> tuple[onnx.ModelProto, str, str]:
    """input -> linear op (``kind``) -> t -> Relu -> out; (model, t, the Relu's name)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, d] if kind != "gemm" else [4, d])
    w = rng.normal(size=(d, e)).astype(np.float32)
    b = rng.normal(size=e).astype(np.float32)
    inits = [numpy_helper.from_array(b, "b")]
    if kind == "gemm":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "w"))
        nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["t"], name="linear", transB=1)]
    elif kind == "matmul_add":
        inits.append(numpy_helper.from_array(w, "w"))
        nodes = [helper.make_node("MatMul", ["input", "w"], ["h"], name="linear"),
                 helper.make_node("Add", ["h", "b"], ["t"], name="bias")]
    else:
        inits = [numpy_helper.from_array(w, "w")]
        nodes = [helper.make_node("MatMul", ["input", "w"], ["t"], name="linear")]
    nodes.append(helper.make_node("Relu", ["t"], ["out"], name="act"))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, e] if kind != "gemm" else [4, e])
    graph = helper.make_graph(nodes, "g", [x], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return infer_shapes(model), "t", "act"


def _both(model, cut, fitted):
    folded, how_folded = place_map(model, cut, fitted, fold=True)
    inserted, how_inserted = place_map(model, cut, fitted, fold=False)
    onnx.checker.check_model(folded, full_check=True)
    onnx.checker.check_model(inserted, full_check=True)
    return folded, how_folded, inserted, how_inserted


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["gemm", "matmul_add", "matmul"]), d=st.integers(1, 9), e=st.integers(1, 9),
       seed=st.integers(0, 1000))
def test_a_map_folded_into_a_matmul_or_gemm_equals_it_inserted(kind, d, e, seed):
    rng = np.random.default_rng(seed)
    model, t, act = _linear_model(kind, d, e, rng)
    fitted = _affine(rng, e, e)
    folded, how, inserted, _ = _both(model, Cut(t, "t_original", ((act, 0),), axis=-1 % 3 if kind != "gemm" else 1),
                                     fitted)
    assert how.startswith("folded into linear")
    assert len(folded.graph.node) <= len(model.graph.node) + (1 if kind == "matmul" else 0)
    x = rng.normal(size=[dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    a, = run(folded, {"input": x})
    b, = run(inserted, {"input": x})
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    # and it is the map itself: relu(t M + c) with t the original's output
    t_value = run(_with_output(model, "t"), {"input": x})[-1]
    np.testing.assert_allclose(b, np.maximum(t_value @ fitted.weight + fitted.bias, 0), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(cin=st.integers(1, 6), cout=st.integers(1, 6), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       seed=st.integers(0, 1000))
def test_a_map_folded_into_a_conv_equals_it_inserted_as_a_1x1_conv(cin, cout, k, stride, seed):
    rng = np.random.default_rng(seed)
    g = GraphBuilder((2, cin, 7, 7), seed=seed)
    t = g.conv(g.input, cout, k=k, stride=stride, name="producer")
    out = g.relu(t)
    model = infer_shapes(g.build([out]))
    act = next(n.name for n in model.graph.node if n.op_type == "Relu")
    folded, how, inserted, how_inserted = _both(model, Cut(t, "target", ((act, 0),), axis=1), _affine(rng, cout, cout))
    assert how == "folded into producer" and how_inserted.startswith("inserted as")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    x = rng.normal(size=(2, cin, 7, 7)).astype(np.float32)
    a, = run(folded, {"input": x})
    b, = run(inserted, {"input": x})
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_a_tensor_with_another_reader_gets_the_map_inserted():
    rng = np.random.default_rng(0)
    g = GraphBuilder((1, 3, 5, 5))
    t = g.conv(g.input, 3, name="producer")
    out = g.add(g.relu(t), t)  # t is also read by the Add, which keeps reading it unmapped
    model = infer_shapes(g.build([out]))
    act = next(n.name for n in model.graph.node if n.op_type == "Relu")
    placed, how = place_map(model, Cut(t, "target", ((act, 0),), axis=1), _affine(rng, 3, 3))
    assert how.startswith("inserted as")
    onnx.checker.check_model(placed, full_check=True)
    x = rng.normal(size=(1, 3, 5, 5)).astype(np.float32)
    assert np.isfinite(run(placed, {"input": x})[0]).all()


def test_the_repaired_tensor_takes_the_original_name_when_it_is_free():
    rng = np.random.default_rng(0)
    model, t, act = _linear_model("matmul_add", 4, 4, rng)
    placed, _ = place_map(model, Cut(t, "the_original_name", ((act, 0),), axis=2), _affine(rng, 4, 4))
    assert next(n for n in placed.graph.node if n.name == act).input[0] == "the_original_name"
    placed, _ = place_map(model, Cut(t, "out", ((act, 0),), axis=2), _affine(rng, 4, 4))
    assert next(n for n in placed.graph.node if n.name == act).input[0] == "out/repaired1"


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy
