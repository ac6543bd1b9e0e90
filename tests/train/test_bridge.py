"""GraphModule, the trainable torch copy of an ONNX graph, against onnxruntime: the shipped models, every zoo
architecture from both exporters, small graphs for tricky op semantics; gradients reach every weight, and
write_back changes exactly the bytes of the weights that changed."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import OnnxPruneError
from onnxprune.train.bridge import GraphModule, UnsupportedOperators, write_back
from tests import zoo
from tests.conftest import run

MODELS = Path(__file__).resolve().parents[2] / "models"
REFERENCE_MODELS = ["resnet56", "resnet20", "mobilenetv2"]
ZOO = zoo.name_exporter_params()  # the dynamo exports of zoo.DYNAMO_SLOW with -m slow
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
INT64_MAX = 2**63 - 1


def assert_matches(actual: list[torch.Tensor], expected: list[np.ndarray]) -> None:
    """max |a - b| <= 1e-4 * max(1, max |expected|) (2e-3 for float16: two units in the last place), same shapes
    and dtypes."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a = a.detach().numpy()
        assert a.dtype == e.dtype and a.shape == e.shape
        if e.size:
            scale = max(1.0, float(np.abs(e.astype(np.float64)).max()))
            tolerance = 2e-3 if e.dtype == np.float16 else 1e-4
            assert float(np.abs(a.astype(np.float64) - e).max()) <= tolerance * scale


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> GraphModule:
    """Run ``model`` in GraphModule and onnxruntime on the same feeds and compare every output."""
    module = GraphModule(model, outputs)
    assert_matches(module({k: torch.from_numpy(v) for k, v in feeds.items()}), run(model, feeds))
    return module


def make_model(nodes, feeds: dict[str, np.ndarray], outputs: list[str], inits: dict | None = None,
               opset: int = 17) -> onnx.ModelProto:
    """A model of ``nodes`` whose inputs are typed after ``feeds`` and whose initializers are ``inits``."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for name, a in feeds.items()]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def random(rng, *shape) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def image_feeds(model: onnx.ModelProto, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {model.graph.input[0].name: random(np.random.default_rng(seed), 4, 3, size, size)}


def differentiable_initializers(model: onnx.ModelProto, outputs: list[str]) -> set[str]:
    """Float initializers that an output depends on, not through Shape or Size (which read a shape, not values)."""
    producer = {name: node for node in model.graph.node for name in node.output}
    seen, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None and node.op_type not in ("Shape", "Size"):
            stack.extend(i for i in node.input if i)
    return {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES and t.name in seen}


# --------------------------------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_reference_models_match_onnxruntime(name):
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    check(model, image_feeds(model, 32))


def test_an_opset_9_classic_runs_as_it_is():
    """LRN, MaxPool, AveragePool, Dropout, Reshape, opset-9 Softmax; weights computed by ConstantOfShape."""
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_inception_v1.onnx"
    if not path.exists():
        pytest.skip(f"this onnx package ships no {path.name}")
    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}
    data = next(i for i in model.graph.input if i.name not in initializers)
    shape = [d.dim_value for d in data.type.tensor_type.shape.dim]
    logits = next(n for n in model.graph.node if n.op_type == "Softmax").input[0]  # the probabilities are all tiny
    model.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    check(model, {data.name: random(np.random.default_rng(3), *shape)})


@pytest.mark.parametrize("name, exporter", ZOO)
def test_zoo_exports_match_onnxruntime(exported, name, exporter):
    model = onnx.load(str(exported(name, exporter)))
    check(model, {"input": random(np.random.default_rng(1), 2, 3, zoo.INPUT_SIZE[name], zoo.INPUT_SIZE[name])})


@pytest.mark.parametrize("source", ["resnet56", ("vit_b_16", "torchscript"), ("vit_b_16", "dynamo"),
                                    ("convnext_tiny", "torchscript"), ("convnext_tiny", "dynamo"),
                                    ("mobilenet_v3_small", "torchscript"),
                                    pytest.param(("mobilenet_v3_small", "dynamo"), marks=pytest.mark.slow)])
def test_every_weight_receives_a_gradient(exported, source):
    if isinstance(source, str):
        model, size = onnx.load(str(MODELS / f"{source}.onnx")), 32
    else:
        model, size = onnx.load(str(exported(*source))), zoo.INPUT_SIZE[source[0]]
    module = GraphModule(model)
    module.train()  # training mode must not matter
    feeds = image_feeds(model, size)
    outputs = module({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert_matches(outputs, run(model, feeds))
    sum(o.float().sum() for o in outputs).backward()
    parameters = module.onnx_parameters()
    expected = differentiable_initializers(model, module.output_names)
    assert expected and expected <= set(parameters)
    assert sorted(n for n in expected if parameters[n].grad is None) == []


def test_a_feature_map_before_global_pooling_can_be_returned_too(exported):
    for model, size in ((onnx.load(str(MODELS / "resnet20.onnx")), 32),
                        (onnx.load(str(exported("resnet18", "dynamo"))), zoo.INPUT_SIZE["resnet18"])):
        pool = next(n for n in model.graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean"))
        logits, features = model.graph.output[0].name, pool.input[0]
        extended = onnx.ModelProto()
        extended.CopyFrom(model)
        extended.graph.output.append(helper.make_tensor_value_info(features, TensorProto.FLOAT, None))
        feeds = {model.graph.input[0].name: random(np.random.default_rng(2), 2, 3, size, size)}
        module = GraphModule(model, outputs=[logits, features])
        assert_matches(module({k: torch.from_numpy(v) for k, v in feeds.items()}), run(extended, feeds))
        assert module(feeds)[1].dim() == 4
        # only what the features need runs: the head's weights are untouched by a loss on them
        only_features = GraphModule(model, outputs=[features])
        only_features(feeds)[0].sum().backward()
        parameters = only_features.onnx_parameters()
        head = {n for n, p in parameters.items() if p.grad is None}
        assert head and head == set(parameters) - differentiable_initializers(model, [features])


# --------------------------------------------------------------------------------------------------------------------
# write-back
# --------------------------------------------------------------------------------------------------------------------

def test_write_back_of_an_untouched_module_is_byte_identical():
    for name in ("resnet20", "mobilenetv2"):
        model = onnx.load(str(MODELS / f"{name}.onnx"))
        module = GraphModule(model)
        module(image_feeds(model, 32))[0].sum().backward()  # gradients alone change nothing
        assert write_back(model, module).SerializeToString() == model.SerializeToString()


def test_write_back_changes_only_the_changed_initializer():
    model = onnx.load(str(MODELS / "resnet20.onnx"))
    module = GraphModule(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in module.onnx_parameters())
    with torch.no_grad():
        module.onnx_parameters()[conv.input[1]].mul_(2)
    written = write_back(model, module)
    feeds = image_feeds(model, 32)
    assert_matches(module({k: torch.from_numpy(v) for k, v in feeds.items()}), run(written, feeds))
    changed = [a.name for a, b in zip(model.graph.initializer, written.graph.initializer)
               if a.SerializeToString() != b.SerializeToString()]
    assert changed == [conv.input[1]]
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[1]))
    new = numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == conv.input[1]))
    np.testing.assert_array_equal(new, original * 2)
    # everything but the initializers is the same
    for m in (model, written):
        del m.graph.initializer[:]
    assert written.SerializeToString() == model.SerializeToString()


def test_weights_in_constant_nodes_and_float16_are_parameters_written_back_in_their_dtype():
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(random(rng, 4, 3), "w_value")
    nodes = [
        helper.make_node("Constant", [], ["w"], value=weight),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Identity", ["w"], ["w_id"]),
        helper.make_node("MatMul", ["x", "w_id"], ["y"]),
        helper.make_node("Mul", ["y", "two"], ["y2"]),
        helper.make_node("Cast", ["y2"], ["y16"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["y16", "b16"], ["z16"]),
    ]
    feeds = {"x": random(rng, 2, 4)}
    model = make_model(nodes, feeds, ["z16"], {"b16": rng.normal(size=3).astype(np.float16)})
    module = check(model, feeds)
    parameters = module.onnx_parameters()
    assert set(parameters) == {"w", "b16"} and all(p.dtype == torch.float32 for p in parameters.values())
    assert write_back(model, module).SerializeToString() == model.SerializeToString()
    with torch.no_grad():
        parameters["w"].add_(1)
        parameters["b16"].mul_(-3)
    written = write_back(model, module)
    assert written.graph.initializer[0].data_type == TensorProto.FLOAT16
    assert written.graph.node[0].attribute[0].t.data_type == TensorProto.FLOAT
    assert_matches(module({"x": torch.from_numpy(feeds["x"])}), run(written, feeds))


# --------------------------------------------------------------------------------------------------------------------
# op semantics on small graphs
# --------------------------------------------------------------------------------------------------------------------

@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime refuses dilations with SAME_UPPER / SAME_LOWER
    dilations = [draw(st.integers(1, 1 if auto_pad.startswith("SAME") else 2)) for _ in range(dims)]
    sizes = [draw(st.integers((k - 1) * d + 1, 8 if dims < 3 else 5)) for k, d in zip(kernel, dilations)]
    attrs = dict(strides=[draw(st.integers(1, 3)) for _ in range(dims)], dilations=dilations, group=groups)
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, 2)) for _ in range(2 * dims)]
    else:
        attrs["auto_pad"] = auto_pad
    return cin, cout, kernel, sizes, attrs, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(conv_cases())
def test_conv_matches_onnxruntime(case):
    cin, cout, kernel, sizes, attrs, bias, seed = case
    rng = np.random.default_rng(seed)
    inits = {"w": random(rng, cout, cin // attrs["group"], *kernel)}
    if bias:
        inits["b"] = random(rng, cout)
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], **attrs)
    feeds = {"x": random(rng, 2, cin, *sizes)}
    check(make_model([node], feeds, ["y"], inits), feeds)


@st.composite
def pool_cases(draw):
    op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    dims = draw(st.sampled_from([1, 2, 2]))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilations = [draw(st.integers(1, 2)) for _ in range(dims)]
    sizes = [draw(st.integers((k - 1) * d + 1, 9)) for k, d in zip(kernel, dilations)]
    attrs = dict(kernel_shape=kernel, strides=[draw(st.integers(1, 3)) for _ in range(dims)], dilations=dilations,
                 ceil_mode=int(draw(st.booleans())))
    attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel + kernel]
    if op == "AveragePool":
        attrs["count_include_pad"] = int(draw(st.booleans()))
    return op, sizes, attrs, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(pool_cases())
def test_pooling_matches_onnxruntime(case):
    op, sizes, attrs, seed = case
    feeds = {"x": random(np.random.default_rng(seed), 2, 3, *sizes)}
    check(make_model([helper.make_node(op, ["x"], ["y"], **attrs)], feeds, ["y"], opset=19), feeds)


def test_pooling_with_asymmetric_pads_and_ceil_mode():
    feeds = {"x": random(np.random.default_rng(4), 1, 2, 7, 8)}
    for op, extra in (("MaxPool", {}), ("AveragePool", {"count_include_pad": 1}), ("AveragePool", {})):
        node = helper.make_node(op, ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 3], pads=[0, 1, 2, 0], ceil_mode=1,
                                **extra)
        check(make_model([node], feeds, ["y"]), feeds)
    for auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 3], auto_pad=auto_pad)
        check(make_model([node], feeds, ["y"]), feeds)


@st.composite
def slice_cases(draw):
    axes = draw(st.lists(st.integers(-3, 2), min_size=1, max_size=3, unique_by=lambda a: a % 3))
    bound = st.one_of(st.integers(-9, 9), st.sampled_from([INT64_MAX, -INT64_MAX - 1]))
    starts, ends = [draw(bound) for _ in axes], [draw(bound) for _ in axes]
    steps = [draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    return axes, starts, ends, steps


@settings(max_examples=25, deadline=None)
@given(slice_cases())
def test_slice_matches_onnxruntime(case):
    axes, starts, ends, steps = case
    inits = {name: np.array(v, dtype=np.int64) for name, v in
             (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))}
    feeds = {"x": random(np.random.default_rng(5), 5, 6, 7)}
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    check(make_model([node], feeds, ["y"], inits), feeds)


def test_conv_transpose_matches_onnxruntime():
    rng = np.random.default_rng(6)
    feeds = {"x": random(rng, 2, 4, 5, 6)}
    inits = {"w": random(rng, 4, 3, 3, 2), "b": random(rng, 6)}
    for attrs in (dict(strides=[2, 1]), dict(strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2], group=2),
                  dict(strides=[2, 2], dilations=[2, 1], group=2, pads=[1, 1, 1, 1]),
                  dict(strides=[2, 2], auto_pad="SAME_UPPER", group=2),
                  dict(strides=[2, 2], auto_pad="SAME_LOWER", group=2),
                  dict(strides=[2, 2], output_shape=[10, 11], group=2)):
        inputs = ["x", "w", "b"] if attrs.get("group") == 2 else ["x", "w"]
        weights = inits if attrs.get("group") == 2 else {"w": random(rng, 4, 3, 3, 2)}
        check(make_model([helper.make_node("ConvTranspose", inputs, ["y"], **attrs)], feeds, ["y"], weights), feeds)


def test_reshape_copies_zeros_unless_allowzero_and_infers_minus_one():
    feeds = {"x": random(np.random.default_rng(7), 2, 3, 4)}
    for shape, allowzero in (([0, -1], 0), ([0, 0, 2, -1], 0), ([-1, 0], 0), ([4, 0, -1], 0), ([2, 12], 1)):
        node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)
        check(make_model([node], feeds, ["y"], {"shape": np.array(shape, dtype=np.int64)}, opset=14), feeds)
    empty = {"x": np.zeros((0, 3), np.float32)}
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    check(make_model([node], empty, ["y"], {"shape": np.array([3, 0], dtype=np.int64)}, opset=14), empty)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_flattens_at_axis_before_opset_13(op, opset):
    feeds = {"x": random(np.random.default_rng(8), 2, 3, 4)}
    for axis in (1, -1, 0):
        check(make_model([helper.make_node(op, ["x"], ["y"], axis=axis)], feeds, ["y"], opset=opset), feeds)
    check(make_model([helper.make_node(op, ["x"], ["y"])], feeds, ["y"], opset=opset), feeds)


def test_split_by_attribute_input_and_num_outputs():
    feeds = {"x": random(np.random.default_rng(9), 3, 7)}
    cases = [
        (11, helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[3, 4]), {}),
        (11, helper.make_node("Split", ["x"], ["a", "b", "c"], axis=0), {}),
        (13, helper.make_node("Split", ["x", "s"], ["a", "b", "c"], axis=1), {"s": np.array([1, 2, 4], np.int64)}),
        (18, helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3), {}),
        (18, helper.make_node("Split", ["x"], ["a", "b"], axis=-1, num_outputs=2), {}),
    ]
    for opset, node, inits in cases:
        check(make_model([node], feeds, list(node.output), inits, opset=opset), feeds)


def test_reductions_with_axes_as_attribute_and_as_input():
    feeds = {"x": random(np.random.default_rng(10), 2, 3, 4)}
    axes = {"axes": np.array([0, -1], np.int64), "none": np.array([], np.int64)}
    cases = [
        (17, helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2])),
        (17, helper.make_node("ReduceMax", ["x"], ["y"], axes=[-1], keepdims=0)),
        (17, helper.make_node("ReduceMin", ["x"], ["y"])),
        (17, helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)),
        (17, helper.make_node("ReduceSum", ["x", "none"], ["y"], noop_with_empty_axes=1)),
        (11, helper.make_node("ReduceSum", ["x"], ["y"], axes=[1])),
        (18, helper.make_node("ReduceMean", ["x", "axes"], ["y"])),
        (18, helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)),
        (18, helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0)),
        (18, helper.make_node("ReduceMin", ["x", "none"], ["y"], noop_with_empty_axes=1)),
        (18, helper.make_node("ReduceL2", ["x", "axes"], ["y"])),
        (18, helper.make_node("ReduceSumSquare", ["x", "axes"], ["y"])),
        (18, helper.make_node("ReduceLogSumExp", ["x", "axes"], ["y"])),
        (18, helper.make_node("ReduceProd", ["x", "axes"], ["y"], keepdims=0)),
    ]
    for opset, node in cases:
        inits = {n: axes[n] for n in node.input[1:]}
        check(make_model([node], feeds, ["y"], inits, opset=opset), feeds)


def test_gemm_with_transposes_alpha_and_beta():
    rng = np.random.default_rng(11)
    for attrs, c_shape in ((dict(transB=1, alpha=0.5, beta=2.0), (4,)), (dict(transA=1, alpha=1.5), (1, 4)),
                           (dict(transA=1, transB=1, beta=-1.0), (5, 4)), (dict(), None)):
        feeds = {"a": random(rng, 3, 5) if attrs.get("transA") else random(rng, 5, 3)}
        inits = {"b": random(rng, 4, 3) if attrs.get("transB") else random(rng, 3, 4)}
        if c_shape:
            inits["c"] = random(rng, *c_shape)
        node = helper.make_node("Gemm", ["a", "b", "c"] if c_shape else ["a", "b"], ["y"], **attrs)
        check(make_model([node], feeds, ["y"], inits), feeds)


def test_integer_arithmetic_truncates_and_mod_follows_fmod():
    feeds = {"a": np.array([7, -7, 7, -7, 0, 9], np.int64), "b": np.array([2, 2, -2, -2, 3, -4], np.int64)}
    nodes = [helper.make_node("Div", ["a", "b"], ["div"]), helper.make_node("Mod", ["a", "b"], ["mod"]),
             helper.make_node("Mod", ["a", "b"], ["fmod"], fmod=1)]
    check(make_model(nodes, feeds, ["div", "mod", "fmod"]), feeds)
    floats = {"a": random(np.random.default_rng(12), 6), "b": np.array([2, -2, 1.5, -1.5, 3, 4], np.float32)}
    check(make_model([helper.make_node("Mod", ["a", "b"], ["fmod"], fmod=1)], floats, ["fmod"]), floats)


def test_where_equal_and_comparisons():
    rng = np.random.default_rng(13)
    feeds = {"a": rng.integers(0, 3, (3, 4)).astype(np.int64), "x": random(rng, 3, 4), "y": random(rng, 4)}
    nodes = [
        helper.make_node("Equal", ["a", "one"], ["eq"]),
        helper.make_node("Where", ["eq", "x", "y"], ["w"]),
        helper.make_node("Less", ["x", "y"], ["lt"]),
        helper.make_node("Greater", ["x", "y"], ["gt"]),
        helper.make_node("Not", ["lt"], ["nlt"]),
        helper.make_node("And", ["nlt", "eq"], ["both"]),
        helper.make_node("Cast", ["both"], ["both_f"], to=TensorProto.FLOAT),
    ]
    check(make_model(nodes, feeds, ["w", "gt", "both", "both_f"], {"one": np.array(1, np.int64)}), feeds)


def test_layer_normalization_with_its_statistics():
    rng = np.random.default_rng(14)
    feeds = {"x": random(rng, 2, 3, 4, 5)}
    for axis, shape in ((-1, (5,)), (2, (4, 5)), (-3, (3, 4, 5))):
        inits = {"scale": random(rng, *shape), "bias": random(rng, *shape)}
        node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv"], axis=axis,
                                epsilon=1e-3)
        check(make_model([node], feeds, ["y", "mean", "inv"], inits), feeds)
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y"])
    check(make_model([node], feeds, ["y"], {"scale": random(rng, 5)}), feeds)


def test_pad_modes_with_pads_and_value_as_inputs():
    rng = np.random.default_rng(15)
    feeds = {"x": random(rng, 2, 3, 5, 6)}
    pads = {"pads": np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64), "value": np.array(1.5, np.float32),
            "crop": np.array([0, 1, -1, 2, 0, 0, 1, -2], np.int64)}
    for inputs, mode in ((["x", "pads"], "reflect"), (["x", "pads"], "edge"), (["x", "pads", "value"], "constant"),
                         (["x", "pads"], "constant"), (["x", "crop"], "constant"), (["x", "pads"], "wrap")):
        node = helper.make_node("Pad", inputs, ["y"], mode=mode)
        check(make_model([node], feeds, ["y"], {n: pads[n] for n in inputs[1:]}, opset=19), feeds)
    axes = {"pads": np.array([1, 2, 3, 0], np.int64), "axes": np.array([-1, 1], np.int64)}
    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode="reflect")
    check(make_model([node], feeds, ["y"], axes, opset=18), feeds)
    # a pad value that is a float initializer is a parameter, and gets its gradient
    module = GraphModule(make_model([helper.make_node("Pad", ["x", "pads", "value"], ["y"])], feeds, ["y"],
                                    {"pads": pads["pads"], "value": pads["value"]}))
    module({"x": torch.from_numpy(feeds["x"])})[0].sum().backward()
    assert module.onnx_parameters()["value"].grad is not None


def test_clip_and_batch_normalization_pass_gradients_to_every_tensor():
    rng = np.random.default_rng(16)
    feeds = {"x": random(rng, 2, 3, 4, 4)}
    inits = {"scale": random(rng, 3), "bias": random(rng, 3), "mean": random(rng, 3),
             "var": rng.uniform(0.5, 1.5, 3).astype(np.float32), "low": np.array(-0.5, np.float32),
             "high": np.array(0.7, np.float32)}
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-3),
             helper.make_node("Clip", ["bn", "low", "high"], ["y"]),
             helper.make_node("Clip", ["bn", "", "high"], ["y_high"]),
             helper.make_node("Clip", ["bn"], ["y_none"])]
    model = make_model(nodes, feeds, ["y", "y_high", "y_none"], inits)
    module = check(model, feeds)
    module.train()
    sum(o.sum() for o in module({"x": torch.from_numpy(feeds["x"])})).backward()
    assert all(p.grad is not None for p in module.onnx_parameters().values())
    old = make_model([helper.make_node("Clip", ["x"], ["y"], min=-0.2, max=0.3)], feeds, ["y"], opset=10)
    check(old, feeds)


def test_shape_arithmetic():
    rng = np.random.default_rng(17)
    feeds = {"x": random(rng, 2, 3, 4)}
    ints = {"idx": np.array([-1, 0], np.int64), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
            "two": np.array([2], np.int64), "axes0": np.array([0], np.int64), "s4": np.array(4, np.int64)}
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Shape", ["x"], ["tail"], start=-2),
        helper.make_node("Gather", ["shape", "idx"], ["picked"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"]),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "two", "tail"], ["target"], axis=0),
        helper.make_node("Div", ["target", "two"], ["half"]),
        helper.make_node("ConstantOfShape", ["half"], ["filled"],
                         value=numpy_helper.from_array(np.array([0.25], np.float32))),
        helper.make_node("Range", ["zero", "s4", "one"], ["range"]),
        helper.make_node("Cast", ["range"], ["range_f"], to=TensorProto.FLOAT),
        helper.make_node("Expand", ["range_f", "tail"], ["expanded"]),
        helper.make_node("Squeeze", ["batch1", "axes0"], ["batch0"]),
        helper.make_node("Gather", ["x", "idx"], ["rows"], axis=1),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[2, 0, 1]),
        helper.make_node("Flatten", ["x"], ["flat"], axis=-1),
    ]
    outputs = ["shape", "tail", "picked", "target", "half", "filled", "range", "expanded", "batch0", "rows", "xt",
               "flat"]
    check(make_model(nodes, feeds, outputs, ints), feeds)
    old = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, -1]), helper.make_node("Squeeze", ["u"], ["s"],
                                                                                         axes=[0])]
    check(make_model(old, feeds, ["u", "s"], opset=11), feeds)


@pytest.mark.parametrize("op, attrs, opset", [
    ("Relu", {}, 17), ("LeakyRelu", {"alpha": 0.2}, 17), ("Elu", {"alpha": 0.7}, 17), ("Selu", {}, 17),
    ("Celu", {"alpha": 1.3}, 17), ("Softplus", {}, 17), ("Mish", {}, 18), ("Sigmoid", {}, 17),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17), ("HardSwish", {}, 17), ("Tanh", {}, 17), ("Erf", {}, 17),
    ("Gelu", {}, 20), ("Gelu", {"approximate": "tanh"}, 20), ("Abs", {}, 17), ("Neg", {}, 17), ("Exp", {}, 17),
    ("Sqrt", {}, 17), ("Log", {}, 17), ("Reciprocal", {}, 17), ("Softsign", {}, 17),
    ("ThresholdedRelu", {"alpha": 0.1}, 17), ("GlobalAveragePool", {}, 17), ("GlobalMaxPool", {}, 17),
    ("InstanceNormalization", {"epsilon": 1e-3}, 17), ("LRN", {"size": 3}, 17),
    ("LRN", {"size": 5, "alpha": 0.1, "bias": 2.0}, 17),
    ("PRelu", {}, 17), ("Dropout", {}, 17), ("Identity", {}, 17), ("ArgMax", {"axis": 1}, 17),
    ("ArgMin", {"axis": -1, "keepdims": 0, "select_last_index": 1}, 17),
])
def test_unary_ops(op, attrs, opset):
    rng = np.random.default_rng(18)
    x = random(rng, 2, 3, 4, 5)
    if op in ("Sqrt", "Log"):
        x = np.abs(x) + 0.1
    if op.startswith("Arg"):
        x = np.round(x)  # ties
    inputs, inits = ["x"], {}
    if op == "PRelu":
        inputs, inits = ["x", "slope"], {"slope": random(rng, 3, 1, 1)}
    if op == "InstanceNormalization":
        inputs, inits = ["x", "s", "b"], {"s": random(rng, 3), "b": random(rng, 3)}
    model = make_model([helper.make_node(op, inputs, ["y"], **attrs)], {"x": x}, ["y"], inits, opset=opset)
    module = check(model, {"x": x})
    module.train()  # Dropout stays the identity
    assert_matches(module({"x": torch.from_numpy(x)}), run(model, {"x": x}))


def test_variadic_and_binary_ops():
    rng = np.random.default_rng(19)
    feeds = {"a": random(rng, 3, 4), "b": random(rng, 4), "c": random(rng, 1, 4)}
    nodes = [helper.make_node(op, ["a", "b", "c"], [op.lower()]) for op in ("Min", "Max", "Sum", "Mean")]
    nodes += [helper.make_node(op, ["a", "b"], [op.lower()]) for op in ("Add", "Sub", "Mul", "Div")]
    nodes += [helper.make_node("Abs", ["a"], ["abs"]), helper.make_node("Pow", ["abs", "b"], ["pow"]),
              helper.make_node("Pow", ["a", "two"], ["square"]),
              helper.make_node("MatMul", ["a", "bt"], ["matmul"]),
              helper.make_node("Einsum", ["a", "bt"], ["einsum"], equation="ij,jk->ik")]
    outputs = [n.output[0] for n in nodes]
    check(make_model(nodes, feeds, outputs, {"two": np.array(2, np.int64), "bt": random(rng, 4, 2)}), feeds)


def test_resize_nearest():
    rng = np.random.default_rng(20)
    feeds = {"x": random(rng, 1, 2, 3, 5)}
    inits = {"scales": np.array([1, 1, 2, 1.5], np.float32), "down": np.array([1, 1, 0.5, 0.6], np.float32),
             "sizes": np.array([1, 2, 7, 4], np.int64)}
    for coordinates in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"):
        for rounding in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
            for size_input in (["", "scales"], ["", "", "sizes"], ["", "down"]):
                node = helper.make_node("Resize", ["x"] + size_input, ["y"], mode="nearest",
                                        coordinate_transformation_mode=coordinates, nearest_mode=rounding)
                check(make_model([node], feeds, ["y"], {n: inits[n] for n in size_input if n}, opset=13), feeds)


def test_nodes_run_in_topological_order_whatever_the_file_order():
    feeds = {"x": random(np.random.default_rng(21), 2, 3)}
    nodes = [helper.make_node("Add", ["b", "a"], ["y"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Neg", ["x"], ["a"])]
    model = make_model(nodes, feeds, ["y"])
    module = GraphModule(model)
    sorted_model = make_model(nodes[::-1], feeds, ["y"])
    assert_matches(module(feeds), run(sorted_model, feeds))


def test_feeds_are_cast_to_the_input_type_and_outputs_may_be_inputs():
    feeds = {"x": random(np.random.default_rng(22), 2, 3)}
    module = GraphModule(make_model([helper.make_node("Relu", ["x"], ["y"])], feeds, ["y"]), outputs=["y", "x"])
    y, x = module({"x": torch.from_numpy(feeds["x"]).double()})
    assert y.dtype == x.dtype == torch.float32
    with pytest.raises(OnnxPruneError, match="nothing"):
        GraphModule(make_model([helper.make_node("Relu", ["x"], ["y"])], feeds, ["y"]), outputs=["nothing"])


def test_unsupported_operators_are_all_named_at_construction():
    feeds = {"boxes": random(np.random.default_rng(23), 1, 4, 4), "scores": random(np.random.default_rng(24), 1, 1, 4)}
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["picked"], name="nms"),
             helper.make_node("Frobnicate", ["scores"], ["f1"], domain="com.example", name="frob1"),
             helper.make_node("Frobnicate", ["f1"], ["f2"], domain="com.example", name="frob2"),
             helper.make_node("Resize", ["scores", "", "s"], ["big"], mode="linear", name="linear")]
    model = make_model(nodes, feeds, ["picked", "f2", "big"], {"s": np.array([1, 1, 2], np.float32)})
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOperators) as error:
        GraphModule(model)
    message = str(error.value)
    assert "NonMaxSuppression (1 node, first 'nms')" in message
    assert "com.example:Frobnicate (2 nodes, first 'frob1')" in message
    assert "Resize(mode=linear)" in message and "\n" not in message
    assert isinstance(error.value, OnnxPruneError)
    # a branch that the requested outputs do not need does not matter
    assert GraphModule(model, outputs=["scores"])(feeds)[0].shape == (1, 1, 4)
