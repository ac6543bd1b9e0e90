"""Loading and saving ONNX models.

- Loading validates what the rest of onnxprune relies on (parseable protobuf, a supported opset,
  something to prune, graph outputs, names that are text, initializers whose values fit their data
  type and dims, inputs it can feed: tests/test_fuzz.py feeds it damaged files) and runs shape
  inference on a weight-free skeleton of the model, so a multi-GB model costs no more to infer than
  a small one and symbolic dims (a dynamic batch) survive.
- A model older than the supported opsets (the ONNX Model Zoo classics are at opset 9 or older) is
  upgraded on load with ``onnx.version_converter``, again on the weight-free skeleton, to the oldest
  supported opset; ``load_notes(model)`` says so. Saving keeps the upgraded opset. Newer opsets
  than the supported ones are refused.
- Saving is atomic: everything is written under a temporary name in the target folder and renamed,
  so a crash never leaves a half-written model; models whose weights exceed the protobuf limit, or
  that came with external data, keep their weights in a ``<name>.data`` file beside the output. What
  is saved is an output of the run (onnxprune.outputs): removed again if the run fails or is interrupted.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxprune import outputs
from onnxprune.errors import OnnxPruneError

SUPPORTED_OPSETS = range(11, 22)
# Older models are upgraded to the oldest supported opset, not further: every converter step is an
# adapter that may add nodes (from 13 on, Softmax gains a Flatten/Reshape pair to keep its old
# meaning, Unsqueeze and Squeeze read their axes from a Constant node), and 11 is as far as any
# model needs to go. The ONNX Model Zoo classics (opset 9) convert to 11 and compute the same
# outputs in onnxruntime (tests/graph/test_old_opsets.py).
UPGRADE_TARGET = SUPPORTED_OPSETS.start
COMPUTE_OPS = {"Conv", "Gemm", "MatMul"}
PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_DATA_KEY = "onnxprune.external_data"
_NOTES_KEY = "onnxprune.load_notes"
# Metadata the loader adds for onnxprune's own use; ``save_model`` never writes it out.
_INTERNAL_KEYS = (_EXTERNAL_DATA_KEY, _NOTES_KEY)
# Initializers at most this large keep their values in the skeleton: shape inference needs the
# values of Reshape shapes, axes, pads and the like, never those of weights.
_SKELETON_MAX_ELEMENTS = 64


def default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read, validate and shape-infer an ONNX model. Raises OnnxPruneError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise OnnxPruneError(f"no such file: {path}")
    if path.is_dir():
        raise OnnxPruneError(f"{path} is a folder, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OnnxPruneError(f"{path} is not a readable ONNX model (truncated or not ONNX: {_first_line(exc)})") from None
    if not model.HasField("graph") or not model.graph.node or model.ir_version == 0:
        raise OnnxPruneError(f"{path} is not an ONNX model (no graph, nodes or IR version in it)")
    check_text(model, name=str(path))
    check_attributes(model, name=str(path))
    old_opset = default_opset(model)
    if old_opset is not None and old_opset < SUPPORTED_OPSETS.start:
        model = upgrade_opset(model, UPGRADE_TARGET, name=str(path))
        _add_note(model, f"converted from opset {old_opset} to opset {UPGRADE_TARGET} on load (onnxprune supports "
                         f"opsets {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}); a saved model keeps opset "
                         f"{UPGRADE_TARGET}")
    validate_model(model, name=str(path))
    check_initializers(model, name=str(path))
    check_inputs(model, name=str(path))
    if any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise OnnxPruneError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
        model.metadata_props.add(key=_EXTERNAL_DATA_KEY, value="1")
    return infer_shapes(model)


def load_notes(model: onnx.ModelProto) -> list[str]:
    """What ``load_model`` changed in ``model`` on the way in (an opset upgrade), one line each."""
    return [line for p in model.metadata_props if p.key == _NOTES_KEY for line in p.value.splitlines()]


def _add_note(model: onnx.ModelProto, note: str) -> None:
    for p in model.metadata_props:
        if p.key == _NOTES_KEY:
            p.value += "\n" + note
            return
    model.metadata_props.add(key=_NOTES_KEY, value=note)


def upgrade_opset(model: onnx.ModelProto, target: int, name: str = "model") -> onnx.ModelProto:
    """``model`` converted to default-domain opset ``target`` by ``onnx.version_converter``.

    The converter sees the weight-free skeleton (large initializers become typed graph inputs, as
    for shape inference), so it never copies the weights; they are put back under their names
    afterwards. The IR version is raised to the lowest that ``target`` allows. Raises
    OnnxPruneError with the converter's first line of error.
    """
    opset = default_opset(model)
    skeleton = _without_large_initializers(model)
    try:
        converted = onnx.version_converter.convert_version(skeleton, target)
    except Exception as exc:  # the converter raises RuntimeError, IndexError and others
        raise OnnxPruneError(f"{name} uses opset {opset}; converting it to opset {target} failed: "
                             f"{_first_line(exc)}") from None
    kept = {t.name for t in converted.graph.initializer}
    original_inputs = {vi.name for vi in model.graph.input}
    large = [t for t in model.graph.initializer if t.name not in kept]
    large_names = {t.name for t in large}
    inputs = [vi for vi in converted.graph.input if vi.name not in large_names or vi.name in original_inputs]
    del converted.graph.input[:]
    converted.graph.input.extend(inputs)
    converted.graph.initializer.extend(large)
    min_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(model.ir_version, min_ir)
    converted.producer_name, converted.producer_version = model.producer_name, model.producer_version
    converted.domain, converted.model_version = model.domain, model.model_version
    converted.doc_string = model.doc_string
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    return converted


def validate_model(model: onnx.ModelProto, name: str = "model") -> None:
    opset = default_opset(model)
    if opset is None:
        raise OnnxPruneError(f"{name} imports no default-domain opset")
    if opset not in SUPPORTED_OPSETS:
        raise OnnxPruneError(
            f"{name} uses opset {opset}; supported opsets are {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}"
            " (convert it with onnx.version_converter)"
        )
    if not any(node.op_type in COMPUTE_OPS for node in model.graph.node):
        raise OnnxPruneError(f"{name} has no Conv, Gemm or MatMul node: nothing for onnxprune to prune")
    if not model.graph.output:
        raise OnnxPruneError(f"{name} has no graph outputs")


# Weights onnxprune reads (graphsurgeon and numpy): numeric and boolean types numpy has, and strings.
_WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
                 onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.STRING,
                 onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.UINT32,
                 onnx.TensorProto.UINT64}
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_text(model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse a text field (a name, domain, doc string or metadata entry, anywhere in the model) that is not valid
    UTF-8: protobuf hands it over as bytes, not str (a damaged file)."""
    bad = next((t for t in _text_fields(model) if not isinstance(t, str)), None)
    if bad is not None:
        raise OnnxPruneError(f"{name}: {bytes(bad)[:40]!r} is not valid UTF-8 text where text belongs (a damaged file?)")


_A = onnx.AttributeProto
_ATTRIBUTE_FIELD = {_A.FLOAT: "f", _A.INT: "i", _A.STRING: "s", _A.TENSOR: "t", _A.GRAPH: "g",
                    _A.SPARSE_TENSOR: "sparse_tensor", _A.TYPE_PROTO: "tp", _A.FLOATS: "floats", _A.INTS: "ints",
                    _A.STRINGS: "strings", _A.TENSORS: "tensors", _A.GRAPHS: "graphs",
                    _A.SPARSE_TENSORS: "sparse_tensors", _A.TYPE_PROTOS: "type_protos"}  # type -> its value field


def check_attributes(model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse a node attribute whose type is missing or unknown, or names another field than the one holding its
    value (a damaged file), in the graph and its subgraphs: onnx's helpers cannot read it and onnxruntime refuses
    the model. The check onnx.checker makes, without checking the rest of a large model."""
    values = set(_ATTRIBUTE_FIELD.values())
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            for attr in node.attribute:
                held = {f.name for f, _ in attr.ListFields() if f.name in values}
                if attr.type not in _ATTRIBUTE_FIELD or (held and _ATTRIBUTE_FIELD[attr.type] not in held):
                    raise OnnxPruneError(f"{name}: attribute {attr.name!r} of node {node.name or node.op_type!r} is "
                                         "not of the type it says (a damaged file?)")
                graphs += [attr.g] if attr.HasField("g") else []
                graphs += list(attr.graphs)


def _text_fields(message) -> Iterator:
    """Every value of a protobuf ``string`` field in ``message`` and the messages inside it."""
    for field, value in message.ListFields():
        values = value if _repeated(field) else [value]
        if field.type == field.TYPE_STRING:
            yield from values
        elif field.type == field.TYPE_MESSAGE:
            for inner in values:
                yield from _text_fields(inner)


def _repeated(field) -> bool:
    """Whether a protobuf field is repeated (``is_repeated`` in protobuf >= 5.29, where ``label`` went away)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def check_initializers(model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse an initializer of a data type onnxprune cannot read (bfloat16, float8, int4, an unknown number), with
    negative dims, or with another number of values than its dims need (a damaged file): OnnxPruneError."""
    for t in model.graph.initializer:
        if t.data_type not in _WEIGHT_TYPES:
            raise OnnxPruneError(f"{name}: initializer {t.name!r} is {_type_name(t.data_type)}; onnxprune reads float, "
                                 "integer, boolean and string weights")
        if any(d < 0 for d in t.dims):
            raise OnnxPruneError(f"{name}: initializer {t.name!r} has negative dims {list(t.dims)}")
        if external_data_helper.uses_external_data(t) or t.data_type == onnx.TensorProto.STRING:
            continue
        expected = 1
        for d in t.dims:
            expected *= d
        if t.HasField("raw_data"):
            found = len(t.raw_data) / onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        else:
            found = sum(len(getattr(t, f)) for f in _VALUE_FIELDS)  # float16 and bool: one per int32_data entry
        if found != expected:
            raise OnnxPruneError(f"{name}: initializer {t.name!r} holds {found:g} values where its dims {list(t.dims)} "
                                 f"need {expected} (a damaged file?)")


_MAX_INPUT_ELEMENTS = 2**31 - 1  # one batch of a model input: 8 GB of float32, beyond any network onnxprune prunes


def check_inputs(model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse a graph input that onnxprune cannot feed: no tensor, a data type numpy lacks (bfloat16, float8, an
    unknown number) or strings, or a fixed size under 1."""
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        if not vi.type.HasField("tensor_type"):
            raise OnnxPruneError(f"{name}: input {vi.name!r} is not a tensor; onnxprune feeds tensors")
        tensor = vi.type.tensor_type
        if tensor.elem_type not in _WEIGHT_TYPES - {onnx.TensorProto.STRING}:
            raise OnnxPruneError(f"{name}: input {vi.name!r} is {_type_name(tensor.elem_type)}; onnxprune feeds "
                                 "float, integer and boolean tensors")
        dims = tensor.shape.dim
        shown = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
        if any(d.HasField("dim_value") and d.dim_value < 1 for d in dims):
            raise OnnxPruneError(f"{name}: input {vi.name!r} has a size under 1 in its shape {shown}")
        if math.prod(d.dim_value for d in dims if d.HasField("dim_value")) > _MAX_INPUT_ELEMENTS:
            raise OnnxPruneError(f"{name}: input {vi.name!r} has the fixed shape {shown}: more than 2^31 elements, "
                                 "more than onnxprune feeds (a damaged file?)")


def _type_name(data_type: int) -> str:
    if data_type in onnx.TensorProto.DataType.values():
        return onnx.TensorProto.DataType.Name(data_type)
    return f"of unknown data type {data_type}"


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` with ``value_info`` filled by ONNX shape inference (in place, also returned).

    Inference runs on a skeleton whose large initializers are replaced by typed graph inputs, so
    its cost does not depend on the size of the weights.
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(_without_large_initializers(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise OnnxPruneError(f"shape inference failed: {_first_line(exc)}") from None
    known = {vi.name for vi in model.graph.input} | {vi.name for vi in model.graph.output}
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in known)
    return model


def _without_large_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    input_names = {vi.name for vi in model.graph.input}
    for init in model.graph.initializer:
        size = 1
        for d in init.dims:
            size *= d
        if size <= _SKELETON_MAX_ELEMENTS and not external_data_helper.uses_external_data(init):
            graph.initializer.append(init)
        elif init.name not in input_names:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return skeleton


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], external_data: bool | None = None) -> Path:
    """Write ``model`` atomically to ``path``; weights go to ``<name>.data`` beside it when needed.

    ``external_data=None`` decides by itself: external when the model came with external data or
    would not fit in one protobuf.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _had_external_data(model) or over_protobuf_limit(model)
    model = _strip_internal_metadata(model)
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".onnxprune-", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            if (Path(tmp) / data_name).exists():  # absent when every tensor is under the threshold
                outputs.record(path.parent / data_name)
                os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        outputs.record(path)  # removed again if the run fails or is interrupted (onnxprune.outputs)
        os.replace(tmp_model, path)
    return path


def _had_external_data(model: onnx.ModelProto) -> bool:
    return any(p.key == _EXTERNAL_DATA_KEY for p in model.metadata_props)


def _strip_internal_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """The loader's markers (external data, load notes) are for onnxprune only: never written out."""
    if not any(p.key in _INTERNAL_KEYS for p in model.metadata_props):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [p for p in copy.metadata_props if p.key not in _INTERNAL_KEYS]
    del copy.metadata_props[:]
    copy.metadata_props.extend(kept)
    return copy


def weight_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the model's initializers (whatever field holds their values)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too large to serialize in one protobuf (2 GB, less a margin for the graph)."""
    return weight_bytes(model) > PROTOBUF_LIMIT - 2**24


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def specialise_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs named in ``shapes`` have those sizes after the batch (the batch stays as
    it is), shapes inferred again: what a model with symbolic heights and widths is analysed, timed and rewritten
    at (a merged conv's padding depends on its input size)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in copy.graph.input:
        if vi.name not in shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        sizes = tuple(shapes[vi.name])
        if len(sizes) != len(dims) - 1:
            raise OnnxPruneError(f"input {vi.name} has {len(dims)} dimensions; give its {len(dims) - 1} sizes after "
                                 f"the batch, not {list(sizes)}")
        for dim, size in zip(list(dims)[1:], sizes):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise OnnxPruneError(f"input {vi.name} has a fixed size {dim.dim_value} where {size} was given")
            dim.dim_value = int(size)
    del copy.graph.value_info[:]
    return infer_shapes(copy)
