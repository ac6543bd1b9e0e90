"""Capturing intermediate tensors with onnxruntime, and cutting a model into the part that runs
after a given tensor (a suffix), so a candidate change can be scored without re-running the prefix.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx
from onnx import helper


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    for init in g.initializer:
        infos.setdefault(init.name, helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return infos


def _info(infos: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    if name in infos:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(infos[name])
        return copy
    return helper.make_empty_tensor_value_info(name)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors (after its own outputs)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    infos = _value_infos(model)
    present = {o.name for o in copy.graph.output}
    for name in dict.fromkeys(names):
        if name not in present:
            copy.graph.output.append(_info(infos, name))
    return copy


def _sample_elements(info: onnx.ValueInfoProto | None) -> int | None:
    """Elements of one sample of a tensor (its dims after the first; symbolic ones count as 1), None if unknown."""
    t = info.type.tensor_type if info is not None else None
    if t is None or not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim[1:]]
    return max(1, int(np.prod(dims, dtype=np.int64)))


def _itemsize(info: onnx.ValueInfoProto) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def bytes_per_sample(model: onnx.ModelProto, names: list[str]) -> int:
    """Bytes of one sample of the named tensors, each counted once (tensors of unknown shape count 0)."""
    infos = _value_infos(model)
    total = 0
    for name in dict.fromkeys(names):
        elements = _sample_elements(infos.get(name))
        if elements is not None:
            total += elements * _itemsize(infos[name])
    return total


def tensor_width(model: onnx.ModelProto, name: str) -> int:
    """Elements of one sample of tensor ``name`` (what CKA compares), 0 when its shape is unknown."""
    return _sample_elements(_value_infos(model).get(name)) or 0


def activation_bytes_per_sample(model: onnx.ModelProto) -> int:
    """A rough bound on what one sample's activations take while the model runs: three times its largest
    tensor (an op's input and output, and a residual fork held across a block)."""
    g = model.graph
    initializers = {t.name for t in g.initializer}
    largest = 0
    for info in list(g.value_info) + list(g.input) + list(g.output):
        if info.name in initializers:
            continue
        elements = _sample_elements(info)
        if elements is not None:
            largest = max(largest, elements * _itemsize(info))
    return 3 * largest


def capture_batch(model: onnx.ModelProto, names: list[str], batch: int, budget_bytes: int = 1 << 30) -> int:
    """``batch``, lowered so one batch of the captured tensors stays within ``budget_bytes`` (1 GiB)."""
    per_sample = bytes_per_sample(model, names)
    return max(1, min(batch, budget_bytes // max(per_sample, 1)))


def suffix_model(model: onnx.ModelProto, start: str, outputs: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The nodes that compute ``outputs`` from tensor ``start`` onward, as a model.

    Its inputs are ``start`` and the *side inputs*: tensors the suffix reads that are computed
    before it (or are graph inputs), e.g. a shape read from the graph input, or an outer residual's
    fork. They do not depend on ``start``, so the values captured from the original model serve.
    Returns (model, side input names).
    """
    g = model.graph
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for t in node.input:
            consumers.setdefault(t, []).append(i)
        for t in node.output:
            producer[t] = i
    downstream: set[int] = set()
    queue = deque(consumers.get(start, []))
    while queue:
        i = queue.popleft()
        if i not in downstream:
            downstream.add(i)
            queue.extend(c for t in g.node[i].output for c in consumers.get(t, []))
    # Nodes that compute constants (Constant, Identity of a weight) travel with the suffix.
    constant = {t.name for t in g.initializer}
    constant_nodes: set[int] = set()
    for i, node in enumerate(g.node):
        if all(t in constant for t in node.input if t):
            constant_nodes.add(i)
            constant.update(node.output)
    movable = downstream | constant_nodes
    needed: set[int] = set()
    queue = deque(producer[o] for o in outputs if o in producer and producer[o] in downstream)
    while queue:
        i = queue.popleft()
        if i not in needed:
            needed.add(i)
            queue.extend(producer[t] for t in g.node[i].input if t in producer and producer[t] in movable)
    for o in outputs:
        if o != start and (o not in producer or producer[o] not in downstream):
            raise ValueError(f"output {o} is not computed from {start}")
    nodes = [g.node[i] for i in sorted(needed)]
    made = {t for n in nodes for t in n.output}
    initializers = {t.name: t for t in g.initializer}
    read = [t for n in nodes for t in n.input if t and t not in made]
    side = [t for t in dict.fromkeys(read) if t != start and t not in initializers]
    infos = _value_infos(model)
    graph = helper.make_graph(
        nodes, f"{g.name}_from_{start}",
        [_info(infos, start)] + [_info(infos, t) for t in side],
        [_info(infos, o) for o in outputs],
        [initializers[t] for t in dict.fromkeys(read) if t in initializers],
    )
    suffix = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    suffix.functions.extend(model.functions)
    return suffix, side


def feature_tensor(model: onnx.ModelProto) -> str:
    """The classifier's input: the data input of the last Gemm/MatMul on the way to the first output; for a
    model with no classifier there (a detector or a segmenter whose output is a map, SqueezeNet's conv head),
    the first output itself, the natural representation to compare."""
    g = model.graph
    producer = {t: n for n in g.node for t in n.output}
    initializers = {t.name for t in g.initializer}
    queue, seen = deque([g.output[0].name]), set()
    while queue:
        t = queue.popleft()
        node = producer.get(t)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("Gemm", "MatMul"):
            data = [i for i in node.input if i and i not in initializers and _depends_on_input(i, producer, g)]
            if data:
                return data[0]
        queue.extend(node.input)
    return g.output[0].name


# Ops between a feature map and the classifier that only pool or reshape it.
_POOLING = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "AveragePool", "MaxPool"}
_RESHAPING = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"}


def pooled_feature(model: onnx.ModelProto) -> str:
    """The feature map before global pooling (what PRACTISE matches; docs/algorithms.md, section "Healing"):
    from the classifier's input (``feature_tensor``), back through reshapes to a pooling node, and that
    node's input; the classifier's input itself when no pooling lies there (a ViT's class token)."""
    producer = {t: n for n in model.graph.node for t in n.output}
    tensor = feature_tensor(model)
    node = producer.get(tensor)
    while node is not None and node.op_type in _RESHAPING:
        node = producer.get(node.input[0])
    if node is not None and node.op_type in _POOLING:
        return node.input[0]
    return tensor


def _depends_on_input(tensor: str, producer: dict, g: onnx.GraphProto) -> bool:
    inputs = {i.name for i in g.input}
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in inputs:
            return True
        node = producer.get(t)
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.input)
    return False
