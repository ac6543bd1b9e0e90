import numpy as np
import onnx
import pytest

from onnxprune.errors import OnnxPruneError
from onnxprune.graph.io import default_opset, load_model, load_notes, save_model
from tests.builders import GraphBuilder, residual_block
from tests.conftest import run


def small_model(opset: int = 17) -> onnx.ModelProto:
    g = GraphBuilder(("batch", 4, 8, 8), opset=opset)
    return g.build([residual_block(g, g.relu(g.conv(g.input, 16)))])


def test_load_keeps_symbolic_batch_and_infers_shapes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    model = load_model(path)
    shapes = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.value_info}
    assert shapes and all(s[0] == "batch" for s in shapes.values())
    assert all(s[1:] == [16, 8, 8] for s in shapes.values())


@pytest.mark.parametrize("content, message", [
    (b"hello, I am not a model", "not a readable ONNX model"),
    (b"", "not an ONNX model"),
])
def test_not_onnx_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxPruneError, match=message):
        load_model(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "t.onnx"
    path.write_bytes(small_model().SerializeToString()[:-300])
    with pytest.raises(OnnxPruneError, match="truncated|not an ONNX"):
        load_model(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(OnnxPruneError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(OnnxPruneError, match="folder"):
        load_model(tmp_path)


@pytest.mark.parametrize("opset", [22, 23])
def test_newer_opset_is_refused(tmp_path, opset):
    model = small_model()
    model.opset_import[0].version = opset
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(OnnxPruneError, match=f"opset {opset}; supported opsets are 11 to 21"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.parametrize("opset", [7, 9, 10])
def test_older_opset_is_upgraded_with_a_note(tmp_path, rng, opset):
    src = tmp_path / "m.onnx"
    onnx.save(small_model(opset), src)
    model = load_model(src)
    assert default_opset(model) == 11
    assert load_notes(model) == [f"converted from opset {opset} to opset 11 on load (onnxprune supports opsets 11"
                                 " to 21); a saved model keeps opset 11"]
    # the weights (over the skeleton's size limit) are back as initializers, not graph inputs
    assert [vi.name for vi in model.graph.input] == ["input"]
    assert len(model.graph.initializer) == len(small_model(opset).graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    out = save_model(model, tmp_path / "out.onnx")
    saved = onnx.load(out)
    assert default_opset(saved) == 11 and not any(p.key.startswith("onnxprune.") for p in saved.metadata_props)
    assert load_notes(load_model(out)) == []
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(str(src), {"input": x})[0], run(str(out), {"input": x})[0])


def test_older_opset_with_external_data_is_upgraded(tmp_path, rng):
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save(small_model(10), src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = load_model(src)
    assert default_opset(model) == 11 and len(load_notes(model)) == 1
    out = save_model(model, tmp_path / "out" / "m.onnx")
    assert (tmp_path / "out" / "m.onnx.data").exists()
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(str(src), {"input": x})[0], run(str(out), {"input": x})[0])


def test_failed_upgrade_names_the_opset_and_the_converter_error(tmp_path):
    model = small_model(10)
    model.graph.node.append(onnx.helper.make_node("NoSuchOp", [model.graph.output[0].name], ["extra"]))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(OnnxPruneError) as info:
        load_model(tmp_path / "m.onnx")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'm.onnx'} uses opset 10; converting it to opset 11 failed: ")
    assert "NoSuchOp" in message or "schema" in message


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
def test_supported_opsets_load(tmp_path, opset):
    onnx.save(small_model(opset), tmp_path / "m.onnx")
    assert load_model(tmp_path / "m.onnx").opset_import[0].version == opset


def test_model_without_compute_is_refused(tmp_path):
    g = GraphBuilder()
    onnx.save(g.build([g.relu(g.input)]), tmp_path / "m.onnx")
    with pytest.raises(OnnxPruneError, match="no Conv, Gemm or MatMul"):
        load_model(tmp_path / "m.onnx")


def test_external_data_round_trip(tmp_path, rng):
    model = small_model()
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save(model, src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = load_model(src)
    out = save_model(loaded, tmp_path / "out" / "copy.onnx")
    assert (tmp_path / "out" / "copy.onnx.data").exists()
    assert not any(p.key.startswith("onnxprune.") for p in onnx.load(out, load_external_data=False).metadata_props)
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(str(src), {"input": x})[0], run(str(out), {"input": x})[0])


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = save_model(small_model(), tmp_path / "a.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]
    onnx.checker.check_model(onnx.load(path))


def test_weights_over_the_protobuf_limit_go_to_external_data(tmp_path, monkeypatch):
    import onnxprune.graph.io as io

    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 2**24 + 1000)  # pretend ~1 kB is the 2 GB limit
    path = save_model(small_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    onnx.checker.check_model(str(path))


def _damaged(kind: str) -> bytes:
    """small_model() with one thing damaged, as the fuzzer (tests/test_fuzz.py) found them."""
    model = small_model()
    g = model.graph
    if kind == "bfloat16 weight":
        g.initializer[0].data_type = onnx.TensorProto.BFLOAT16
    elif kind == "unknown weight type":
        g.initializer[0].data_type = 99
    elif kind == "short weight":
        g.initializer[0].raw_data = g.initializer[0].raw_data[:-3]
    elif kind == "negative dim":
        g.initializer[0].dims[0] = -1
    elif kind == "no outputs":
        del g.output[:]
    elif kind == "input size 0":
        g.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    elif kind == "huge input":
        g.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 40
    elif kind == "bfloat16 input":
        g.input[0].type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    elif kind == "graph name not utf-8":
        g.name = "graph-name-to-damage"
    elif kind == "attribute without a type":
        next(n for n in g.node if n.attribute).attribute[0].type = onnx.AttributeProto.UNDEFINED
    elif kind == "attribute of another type":  # ints said to be floats: one flipped bit (a fuzzer's find)
        next(a for n in g.node for a in n.attribute if a.ints).type = onnx.AttributeProto.FLOATS
    data = model.SerializeToString()
    if kind == "name not utf-8":
        name = g.node[0].output[0].encode()
        data = data.replace(name, b"\x87" + name[1:])
    if kind == "graph name not utf-8":  # any text field, not only names of nodes and tensors (a fuzzer's find)
        data = data.replace(b"graph-name-to-damage", b"graph-name-to-dam\xf3ge")
    return data


@pytest.mark.parametrize("kind, message", [
    ("bfloat16 weight", "is BFLOAT16"), ("unknown weight type", "unknown data type 99"),
    ("short weight", "values where its dims"), ("negative dim", "negative dims"), ("no outputs", "no graph outputs"),
    ("input size 0", "size under 1"), ("huge input", "more than 2^31"), ("bfloat16 input", "input 'input' is BFLOAT16"),
    ("name not utf-8", "not valid UTF-8"), ("graph name not utf-8", "not valid UTF-8"),
    ("attribute without a type", "not of the type it says"),
    ("attribute of another type", "not of the type it says"),
])
def test_damaged_models_are_refused_with_the_reason(tmp_path, kind, message):
    path = tmp_path / "damaged.onnx"
    path.write_bytes(_damaged(kind))
    with pytest.raises(OnnxPruneError, match=message.replace("^", r"\^")):
        load_model(path)
