"""The ONNX Model Zoo classics at opset 9, as the onnx package ships them for its backend tests
(``light_*.onnx``: the real graphs, with every weight computed by a ``ConstantOfShape``).

Loading upgrades them to opset 11, normalizing turns the computed weights into initializers, and
the result computes what the opset-9 file computes in onnxruntime.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.graph.analysis import analyze_graph
from onnxprune.graph.io import default_opset, load_model, load_notes
from onnxprune.graph.normalize import to_graph, to_model
from tests.conftest import run

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# Residual blocks expected (the others have none).
BLOCKS = {"resnet50": 16, "shufflenet": 13}
NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]
# Fully connected layers of 38M to 103M weights: building their onnxruntime session takes seconds.
SLOW = {"bvlc_alexnet", "vgg19", "zfnet512"}
# Relative to the largest output magnitude; BN folded into the convs reorders float32 rounding
# (measured: at most 1e-5 on the random-fill variants, bit-identical on the shipped files).
RTOL = 1e-4


def _path(name: str) -> Path:
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"this onnx package ships no {path.name}")
    return path


def _slow(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", NAMES)
def test_zoo_classic_loads_upgraded_and_every_conv_has_a_weight(name):
    path = _path(name)
    original = onnx.load(path)
    assert default_opset(original) < 11
    model = load_model(path)
    assert default_opset(model) == 11
    assert load_notes(model) == [f"converted from opset {default_opset(original)} to opset 11 on load (onnxprune "
                                 "supports opsets 11 to 21); a saved model keeps opset 11"]
    graph = to_graph(model)
    assert not any(n.op == "ConstantOfShape" for n in graph.nodes)
    s = analyze_graph(graph, model)
    assert not [note for note in s.notes if "non-constant weight" in note]
    assert s.notes[0] == load_notes(model)[0]  # the analysis says the model was upgraded
    convs = sum(n.op_type == "Conv" for n in original.graph.node)
    assert s.convs and len(s.convs) + len(s.shortcut_convs) == convs
    assert len(s.residual_blocks) == BLOCKS.get(name, 0)
    if name == "resnet50":
        assert len(s.shortcut_convs) == 4 and sum(b.removable for b in s.residual_blocks) == 12


@pytest.mark.parametrize("fill", ["shipped", "random"])
@pytest.mark.parametrize("name", _slow(NAMES))
def test_zoo_classic_normalized_computes_what_the_opset9_file_computes(tmp_path, name, fill):
    """The opset-9 file against the loaded, upgraded, normalized (weights folded, BN folded) model.

    The shipped weights are all 0.02, so the outputs end in a uniform softmax and a swapped BN
    scale and bias would go unseen: the ``random`` variant draws each ConstantOfShape's fill
    value, and both compare the softmax's input (the logits) besides the outputs."""
    original = onnx.load(_path(name))
    rng = np.random.default_rng(0)
    if fill == "random":
        for node in original.graph.node:
            if node.op_type == "ConstantOfShape":
                value = np.array([rng.uniform(0.01, 0.03)], np.float32)
                next(a for a in node.attribute if a.name == "value").t.CopyFrom(numpy_helper.from_array(value))
    last = original.graph.node[-1]
    if last.op_type == "Softmax":
        original.graph.output.append(helper.make_tensor_value_info(last.input[0], onnx.TensorProto.FLOAT, None))
    path = tmp_path / f"{name}.onnx"
    onnx.save(original, path)

    model = load_model(path)
    normalized = to_model(to_graph(model), model)
    assert default_opset(normalized) == 11
    assert not any(n.op_type == "ConstantOfShape" for n in normalized.graph.node)

    initializers = {t.name for t in original.graph.initializer}
    (data,) = [vi for vi in original.graph.input if vi.name not in initializers]
    shape = [d.dim_value for d in data.type.tensor_type.shape.dim]
    feeds = {data.name: rng.normal(size=shape).astype(np.float32)}
    expected, got = run(str(path), feeds), run(normalized, feeds)
    assert [o.name for o in normalized.graph.output] == [o.name for o in original.graph.output]
    for want, have in zip(expected, got):
        assert np.isfinite(want).all()
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(have, want, rtol=0, atol=RTOL * scale)
