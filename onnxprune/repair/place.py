"""Putting a fitted map into a pruned graph: folded exactly into the linear op that produces the cut's
tensor when the algebra allows it, else inserted as a 1x1 conv (channel-first tensors) or a MatMul and
Add (channels last). docs/algorithms.md section 8.

Folding needs the producer to be a Conv (one group, constant weight), a Gemm (alpha = beta = 1,
constant B and C), or a MatMul with a constant weight (with or without an Add of a constant bias
after it), and every reader of its output to be one of the cut's readers. Then

    conv:   W'[e, i, k] = Σ_d M[d, e] W[d, i, k],   b' = b M + c
    matmul: W' = W M,                                b' = b M + c

for the map y = x M + c. A fold adds no node, so the map costs nothing at run time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.repair.cuts import Cut
from onnxprune.repair.fit import AffineMap


def place_map(model: onnx.ModelProto, cut: Cut, fitted: AffineMap, fold: bool = True) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` with ``fitted`` between ``cut.source`` and the cut's readers, and how it was placed
    ("folded into NODE" or "inserted as NODE")."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    name = _fresh(g, cut.target)
    nodes = {n.name: n for n in g.node}
    for node_name, k in cut.readers:
        nodes[node_name].input[k] = name
    how = _fold(g, cut, fitted, name) if fold else None
    if how is None:
        how = _insert(g, cut, fitted, name)
    return out, how


def _fresh(g: onnx.GraphProto, wanted: str) -> str:
    """``wanted`` when no tensor of ``g`` has that name (the original's name for the repaired tensor), else a new one."""
    taken = {t for n in g.node for t in list(n.input) + list(n.output)} | {i.name for i in g.input}
    taken |= {t.name for t in g.initializer}
    name, k = wanted, 0
    while name in taken:
        k += 1
        name = f"{wanted}/repaired{k}"
    return name


def _initializer(g: onnx.GraphProto, array: np.ndarray, name: str) -> str:
    name = _fresh(g, name)
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
    return name


def _constant(g: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in g.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def _fold(g: onnx.GraphProto, cut: Cut, fitted: AffineMap, name: str) -> str | None:
    """Fold the map into the producer of ``cut.source`` (the readers already read ``name``); None if it cannot."""
    producer = next((n for n in g.node if cut.source in n.output), None)
    readers = {(n.name, k) for n in g.node for k, t in enumerate(n.input) if t == cut.source}
    if producer is None or readers or cut.source in {o.name for o in g.output}:
        return None  # a graph input, or another reader still needs the unmapped tensor
    m, c = fitted.weight.astype(np.float64), fitted.bias.astype(np.float64)
    if producer.op_type == "Conv" and cut.axis == 1:
        return _fold_conv(g, producer, m, c, name)
    if cut.axis != (_rank(g, cut.source) or 0) - 1 or producer.op_type not in ("Gemm", "MatMul", "Add"):
        return None  # a MatMul or Gemm maps the last axis only
    if producer.op_type == "Gemm":
        return _fold_gemm(g, producer, m, c, name)
    if producer.op_type == "MatMul":
        return _fold_matmul(g, producer, None, m, c, name)
    return _fold_matmul_add(g, producer, m, c, name)


def _fold_conv(g, conv: onnx.NodeProto, m, c, name: str) -> str | None:
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    weight = _constant(g, conv.input[1]) if len(conv.input) > 1 else None
    if group != 1 or weight is None or weight.shape[0] != m.shape[0]:
        return None
    bias = _constant(g, conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(weight.shape[0])
    if bias is None:
        return None
    new_weight = np.einsum("de,d...->e...", m, weight.astype(np.float64))
    new_bias = bias.astype(np.float64) @ m + c
    del conv.input[1:]
    conv.input.extend([_initializer(g, new_weight, f"{conv.name}/repaired_W"),
                       _initializer(g, new_bias, f"{conv.name}/repaired_B")])
    conv.output[0] = name
    return f"folded into {conv.name}"


def _fold_gemm(g, gemm: onnx.NodeProto, m, c, name: str) -> str | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    b = _constant(g, gemm.input[1])
    bias = _constant(g, gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else np.zeros(1)
    if b is None or bias is None:
        return None
    b_eff = b.T if attrs.get("transB", 0) else b  # (K, N)
    if b_eff.shape[1] != m.shape[0]:
        return None
    new_b = b_eff.astype(np.float64) @ m
    new_bias = np.broadcast_to(bias.astype(np.float64).reshape(-1), (m.shape[0],)) @ m + c
    gemm.input[1] = _initializer(g, new_b.T if attrs.get("transB", 0) else new_b, f"{gemm.name}/repaired_B")
    bias_name = _initializer(g, new_bias, f"{gemm.name}/repaired_C")
    if len(gemm.input) > 2:
        gemm.input[2] = bias_name
    else:
        gemm.input.append(bias_name)
    gemm.output[0] = name
    return f"folded into {gemm.name}"


def _matmul_weight(g, matmul: onnx.NodeProto, m) -> np.ndarray | None:
    w = _constant(g, matmul.input[1])
    return w if w is not None and w.ndim == 2 and w.shape[1] == m.shape[0] else None


def _fold_matmul(g, matmul: onnx.NodeProto, add: onnx.NodeProto | None, m, c, name: str) -> str | None:
    """MatMul(h, W) [+ bias] -> MatMul(h, W M) + (bias M + c): the Add is kept or created for the bias."""
    w = _matmul_weight(g, matmul, m)
    if w is None:
        return None
    matmul.input[1] = _initializer(g, w.astype(np.float64) @ m, f"{matmul.name}/repaired_W")
    if add is not None:
        k = 1 if add.input[0] in matmul.output else 0
        bias = _constant(g, add.input[k])
        add.input[k] = _initializer(g, np.broadcast_to(bias, (m.shape[0],)).astype(np.float64) @ m + c,
                                    f"{add.name}/repaired_B")
        add.output[0] = name
        return f"folded into {matmul.name} and {add.name}"
    hidden = _fresh(g, f"{matmul.name}/repaired_out")
    matmul.output[0] = hidden
    index = list(g.node).index(matmul)
    g.node.insert(index + 1, helper.make_node("Add", [hidden, _initializer(g, c, f"{matmul.name}/repaired_B")], [name],
                                              name=_fresh(g, f"{matmul.name}/repair_bias")))
    return f"folded into {matmul.name} (bias as a new Add)"


def _fold_matmul_add(g, add: onnx.NodeProto, m, c, name: str) -> str | None:
    """Add(MatMul(h, W), bias) where the MatMul's output is read by this Add alone."""
    for k in (0, 1):
        bias = _constant(g, add.input[1 - k])
        matmul = next((n for n in g.node if add.input[k] in n.output), None)
        if bias is None or matmul is None or matmul.op_type != "MatMul" or bias.size not in (1, m.shape[0]):
            continue
        if sum(t == add.input[k] for n in g.node for t in n.input) != 1:
            return None
        return _fold_matmul(g, matmul, add, m, c, name)
    return None


def _insert(g: onnx.GraphProto, cut: Cut, fitted: AffineMap, name: str) -> str:
    """The map as a node of its own after the producer of ``cut.source``: a 1x1 conv, or MatMul + Add."""
    m, c = fitted.weight, fitted.bias
    producer = next((i for i, n in enumerate(g.node) if cut.source in n.output), -1)
    rank = _rank(g, cut.source)
    node_name = _fresh(g, f"{cut.target}/repair")
    if cut.axis == 1 and rank is not None and rank >= 3:
        kernel = m.T.reshape(m.shape[1], m.shape[0], *([1] * (rank - 2)))
        nodes = [helper.make_node("Conv", [cut.source, _initializer(g, kernel, f"{node_name}/W"),
                                           _initializer(g, c, f"{node_name}/B")], [name], name=node_name)]
    else:
        hidden = _fresh(g, f"{node_name}/matmul_out")
        nodes = [helper.make_node("MatMul", [cut.source, _initializer(g, m, f"{node_name}/W")], [hidden],
                                  name=node_name),
                 helper.make_node("Add", [hidden, _initializer(g, c, f"{node_name}/B")], [name],
                                  name=_fresh(g, f"{node_name}/bias"))]
    for k, node in enumerate(nodes):
        g.node.insert(producer + 1 + k, node)
    return f"inserted as {node_name}"


def _rank(g: onnx.GraphProto, tensor: str) -> int | None:
    for info in list(g.value_info) + list(g.input) + list(g.output):
        if info.name == tensor and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None
