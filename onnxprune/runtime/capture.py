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
    """What SLP and LayerMerge compare (docs/algorithms.md sections 2 and 9): the classifier's input, i.e. the
    data input of the Gemm/MatMul reached from the first output through nothing but a head's ops (a bias or
    scale by a constant, reshapes, a softmax). A model with no classifier at its output (an encoder whose
    output is its token sequence, a detector or a segmenter whose output is a map, SqueezeNet's conv head)
    is compared at the first output itself."""
    g = model.graph
    output = g.output[0].name
    producer = {t: n for n in g.node for t in n.output}
    initializers = {t.name for t in g.initializer}
    node = producer.get(output)
    while node is not None:
        data = [i for i in node.input if i and i not in initializers and _depends_on_input(i, producer, g)]
        if node.op_type in ("Gemm", "MatMul"):
            return data[0] if len(data) == 1 else output
        if node.op_type in _HEAD_UNARY and node.input[0] in data:
            node = producer.get(node.input[0])
        elif node.op_type in _HEAD_BINARY and len(data) == 1:
            node = producer.get(data[0])
        else:
            return output
    return output


# Ops between a classifier's linear layer and the output: reshapes and a final activation on one tensor
# (its other inputs, a shape or axes, are not data), and arithmetic with a constant (a bias, a scale).
_HEAD_UNARY = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Cast",
               "Softmax", "LogSoftmax", "Sigmoid"}
_HEAD_BINARY = {"Add", "Sub", "Mul", "Div"}


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


# Ops an attention mask passes on its way to the scores: casts, reshapes, broadcasts, arithmetic with
# constants (BERT's (1 - mask) * -10000), comparisons and selections (a Where on a boolean mask).
_MASK_OPS = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Identity", "Slice", "Sub", "Mul", "Div", "Add",
             "Neg", "Not", "Equal", "Less", "Greater", "Where", "Min", "Max", "Clip"}


def attention_mask_input(model: onnx.ModelProto) -> str | None:
    """The graph input that masks attention (docs/algorithms.md section 9), None if none does: a
    (batch, tokens) input read only by the ops a mask passes (``_MASK_OPS``), through which it reaches a
    Softmax. A token-id input is read by an embedding's Gather and never qualifies."""
    g = model.graph
    initializers = {t.name for t in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for t in dict.fromkeys(node.input):
            readers.setdefault(t, []).append(node)
    for vi in g.input:
        if vi.name in initializers or len(vi.type.tensor_type.shape.dim) != 2:
            continue
        if readers.get(vi.name) and all(n.op_type in _MASK_OPS for n in readers[vi.name]) and _reaches_softmax(vi.name, readers):
            return vi.name
    return None


def _reaches_softmax(tensor: str, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether a Softmax reads ``tensor`` through ``_MASK_OPS`` alone."""
    queue, seen = deque([tensor]), set()
    while queue:
        for node in readers.get(queue.popleft(), []):
            if node.op_type == "Softmax":
                return True
            if node.op_type in _MASK_OPS and id(node) not in seen:
                seen.add(id(node))
                queue.extend(node.output)
    return False


def _masks_tokens(shape: tuple, tokens: int | None) -> bool:
    """Whether a tensor of ``shape`` (batch first) is a token sequence that a (batch, ``tokens``) mask covers."""
    return tokens is not None and len(shape) >= 3 and shape[1] == tokens


def feature_rows(values: np.ndarray, count: int, mask: np.ndarray | None = None) -> np.ndarray:
    """The rows CKA compares for the first ``count`` samples of a captured tensor (docs/algorithms.md sections 1 and 9).

    A token sequence (batch, tokens, ...) of a model with an attention mask (batch, tokens) becomes one row per
    sample: the mean of its tokens where the mask is non-zero. Padding tokens are left out because the model
    itself ignores them (their values are whatever the network computes for a pad token, and removing a
    block changes them for no reason a real token would see), and a mean over real tokens keeps one row
    per sample, so CKA's n stays the number of samples whatever the lengths. Anything else is flattened."""
    values = values[:count]
    if mask is None or not _masks_tokens(values.shape, mask.shape[1]) or len(mask) < count:
        return values.reshape(count, -1)
    keep = (mask[:count] != 0).astype(np.float64)
    total = np.einsum("bt,bt...->b...", keep, values.astype(np.float64))
    return (total.reshape(count, -1) / np.maximum(keep.sum(axis=1), 1.0)[:, None]).astype(np.float32)


def row_width(model: onnx.ModelProto, name: str, tokens: int | None = None) -> int:
    """Elements of the row ``feature_rows`` makes of one sample of tensor ``name`` (0 when its shape is unknown):
    without the token axis when a mask over ``tokens`` tokens pools it."""
    info = _value_infos(model).get(name)
    width = _sample_elements(info) or 0
    dims = info.type.tensor_type.shape.dim if info is not None else []
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return width // tokens if width and _masks_tokens(shape, tokens) else width


def _depends_on_input(tensor: str, producer: dict, g: onnx.GraphProto) -> bool:
    """Whether ``tensor`` is computed from a graph input (a name that a node produces is not one, even where an
    old file lists it among the inputs, as the ONNX model-zoo classics do for weights they compute)."""
    inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if node is None:
            if t in inputs:
                return True
        elif id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.input)
    return False


def prefix_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The nodes ``outputs`` need, as a model with the same inputs, giving only ``outputs``: what capturing
    early tensors costs without running the rest of the network."""
    g = model.graph
    producer = {t: i for i, node in enumerate(g.node) for t in node.output}
    needed: set[int] = set()
    queue = deque(producer[o] for o in outputs if o in producer)
    while queue:
        i = queue.popleft()
        if i not in needed:
            needed.add(i)
            queue.extend(producer[t] for t in g.node[i].input if t in producer)
    nodes = [g.node[i] for i in sorted(needed)]
    read = {t for n in nodes for t in n.input} | set(outputs)
    infos = _value_infos(model)
    graph = helper.make_graph(nodes, f"{g.name}_prefix", list(g.input), [_info(infos, o) for o in outputs],
                              [t for t in g.initializer if t.name in read])
    prefix = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    prefix.functions.extend(model.functions)
    return prefix
