"""What onnxprune knows about individual ops: activations, convolution attributes, cost.

Everything here reads one node (or one small elementwise island) and returns plain data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

# Ops that only move metadata: their outputs describe shapes, not activations.
SHAPE_OPS = {"Shape", "Size"}
NO_OP = {"Identity", "Dropout"}
UNARY_ACTIVATIONS = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Gelu", "LeakyRelu", "Elu",
                     "Selu", "Celu", "Softplus", "Mish", "PRelu", "ThresholdedRelu"}
# Elementwise ops that may form an activation together with constants (GELU as Erf, SiLU as x*sigmoid(x)).
_ISLAND_OPS = UNARY_ACTIVATIONS | {"Erf", "Mul", "Add", "Div", "Sub", "Pow", "Sqrt"}
_MAX_ISLAND = 8


@dataclass(frozen=True)
class Activation:
    """An activation found after a tensor: its kind, the nodes that form it, its input and output."""

    kind: str
    nodes: tuple[gs.Node, ...]
    input: gs.Variable
    output: gs.Variable


def is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def variable_inputs(node: gs.Node) -> list[gs.Variable]:
    return [t for t in node.inputs if isinstance(t, gs.Variable) and not t.is_empty()]


def activation_after(x: gs.Variable, graph_outputs: set[str]) -> Activation | None:
    """The activation applied to ``x``, if one is: a single activation op or an elementwise island
    of ops on ``x`` and constants (SiLU as Sigmoid-Mul, HardSwish as HardSigmoid-Mul, GELU with Erf)."""
    members: list[gs.Node] = []
    known = {x.name}
    grew = True
    while grew and len(members) < _MAX_ISLAND:
        grew = False
        for tensor in [x] + [o for n in members for o in n.outputs]:
            for node in tensor.outputs:
                if node in members or node.op not in _ISLAND_OPS or len(node.outputs) != 1:
                    continue
                if all(t.name in known for t in variable_inputs(node)):
                    members.append(node)
                    known.add(node.outputs[0].name)
                    grew = True
    island = _closed_island(members, graph_outputs)
    if island is not None:
        kind = _classify(island)
        if kind is not None:
            return Activation(kind, tuple(island), x, island[-1].outputs[0])
    first = [n for n in x.outputs if n.op in UNARY_ACTIVATIONS and len(n.outputs) == 1]
    if len(first) == 1 and len(variable_inputs(first[0])) == 1:
        node = first[0]
        return Activation(_classify([node]) or node.op, (node,), x, node.outputs[0])
    return None


def activation_containing(node: gs.Node, graph_outputs: set[str]) -> Activation | None:
    """The activation that ``node`` is part of, found from the tensors at most a few elementwise
    steps upstream of it (an island's input is at most ``_MAX_ISLAND`` nodes away)."""
    frontier, seen = [node], set()
    for _ in range(_MAX_ISLAND):
        inputs = [t for n in frontier for t in variable_inputs(n) if t.name not in seen]
        for x in inputs:
            seen.add(x.name)
            act = activation_after(x, graph_outputs)
            if act is not None and any(n is node for n in act.nodes):
                return act
        frontier = [t.inputs[0] for t in inputs if t.inputs and t.inputs[0].op in _ISLAND_OPS]
        if not frontier:
            break
    return None


def _closed_island(members: list[gs.Node], graph_outputs: set[str]) -> list[gs.Node] | None:
    """``members`` if exactly one of their outputs leaves the island (the last one), else None."""
    if not members:
        return None
    inside = set(map(id, members))
    leaving = [
        n for n in members
        if n.outputs[0].name in graph_outputs or any(id(c) not in inside for c in n.outputs[0].outputs)
        or not n.outputs[0].outputs
    ]
    if len(leaving) != 1:
        return None
    last = leaving[0]
    return [n for n in members if n is not last] + [last]


def _classify(nodes: list[gs.Node]) -> str | None:
    ops = sorted(n.op for n in nodes)
    if ops == ["Clip"]:
        low, high = clip_bounds(nodes[0])
        return "ReLU6" if (low, high) == (0.0, 6.0) else ("Relu" if (low, high) == (0.0, math.inf) else "Clip")
    if len(ops) == 1 and ops[0] in UNARY_ACTIVATIONS:
        return ops[0]
    if ops == ["Mul", "Sigmoid"]:
        return "SiLU"
    if ops == ["HardSigmoid", "Mul"]:
        return "HardSwish"
    if ops == ["Mish"] or ops == ["Mul", "Softplus", "Tanh"]:
        return "Mish"
    if "Erf" in ops or ("Tanh" in ops and "Pow" in ops):
        return "Gelu"
    return None


# Attributes (with their ONNX defaults) that change what an activation op computes.
ACTIVATION_ATTRS = {
    "LeakyRelu": {"alpha": 0.01}, "HardSigmoid": {"alpha": 0.2, "beta": 0.5}, "Elu": {"alpha": 1.0},
    "Selu": {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875}, "Celu": {"alpha": 1.0},
    "ThresholdedRelu": {"alpha": 1.0},
}


def activation_attrs(act: Activation) -> dict:
    """What besides its kind determines ``act``, as JSON-serialisable data: Clip bounds (None when
    unbounded), the alpha/beta/gamma of LeakyRelu, HardSigmoid, Elu, Selu, Celu, ThresholdedRelu, the
    shape of a PRelu slope, the tanh form of a GELU. Empty for Relu, Sigmoid, SiLU and the like."""
    if act.kind in ("ReLU6", "Clip"):
        low, high = clip_bounds(next(n for n in act.nodes if n.op == "Clip"))
        return {"min": low if math.isfinite(low) else None, "max": high if math.isfinite(high) else None}
    if act.kind in ACTIVATION_ATTRS and len(act.nodes) == 1:
        node = act.nodes[0]
        return {k: float(node.attrs.get(k, v)) for k, v in ACTIVATION_ATTRS[act.kind].items()}
    if act.kind == "PRelu":
        shape = act.nodes[0].inputs[1].shape
        return {"slope_shape": [int(d) for d in shape]} if shape is not None and all(
            isinstance(d, int) for d in shape) else {}
    if act.kind == "Gelu":
        tanh = any(n.op == "Tanh" for n in act.nodes) or any(n.attrs.get("approximate") == "tanh" for n in act.nodes)
        return {"approximate": "tanh"} if tanh else {}
    return {}


def clip_bounds(node: gs.Node) -> tuple[float, float]:
    low, high = node.attrs.get("min", -math.inf), node.attrs.get("max", math.inf)
    if len(node.inputs) > 1 and is_constant(node.inputs[1]) and not node.inputs[1].is_empty():
        low = float(np.asarray(node.inputs[1].values))
    if len(node.inputs) > 2 and is_constant(node.inputs[2]) and not node.inputs[2].is_empty():
        high = float(np.asarray(node.inputs[2].values))
    return float(low), float(high)


@dataclass(frozen=True)
class ConvInfo:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int
    in_channels: int
    out_channels: int

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)


def conv_info(node: gs.Node) -> ConvInfo | None:
    """Attributes of a Conv whose weight is a constant, else None."""
    if node.op != "Conv" or len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return None
    shape = tuple(int(d) for d in node.inputs[1].shape)
    spatial = len(shape) - 2
    groups = int(node.attrs.get("group", 1))
    pads = tuple(int(p) for p in node.attrs.get("pads", [0] * (2 * spatial)))
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        pads = tuple(-1 for _ in range(2 * spatial))  # SAME_*: depends on the input size
    return ConvInfo(
        kernel=shape[2:],
        stride=tuple(int(s) for s in node.attrs.get("strides", [1] * spatial)),
        dilation=tuple(int(d) for d in node.attrs.get("dilations", [1] * spatial)),
        pads=pads,
        groups=groups,
        in_channels=shape[1] * groups,
        out_channels=shape[0],
    )


def _per_sample(shape: list | tuple | None) -> int | None:
    """Element count of ``shape`` with symbolic dims (a dynamic batch) counted as 1."""
    if shape is None:
        return None
    return math.prod(d if isinstance(d, int) and d >= 0 else 1 for d in shape)


def node_macs(node: gs.Node) -> int:
    """Multiply-accumulates of one Conv, ConvTranspose, Gemm or MatMul (0 for anything else or unknown)."""
    if not node.outputs or node.outputs[0].shape is None:
        return 0
    out = _per_sample(node.outputs[0].shape) or 0
    if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1].shape is not None:
        w = node.inputs[1].shape
        if node.op == "Conv":
            return out * math.prod(int(d) for d in w[1:])
        return (_per_sample(node.inputs[0].shape) or 0) * math.prod(int(d) for d in w[1:])
    if node.op == "Gemm" and node.inputs[0].shape is not None:
        a = node.inputs[0].shape
        k = a[0] if node.attrs.get("transA", 0) else a[-1]
        return out * (k if isinstance(k, int) else 1)
    if node.op == "MatMul" and node.inputs[0].shape is not None:
        k = node.inputs[0].shape[-1]
        return out * (k if isinstance(k, int) else 1)
    return 0