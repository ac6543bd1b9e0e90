"""Latency tables for LayerMerge: one entry per distinct row (a conv with its trailing activation, at
its real input shape, batch and dtype), timed once on a backend, plus the fixed part of the network.

A row's latency is its own work, without what the whole network pays once rather than per conv
(the call, layout conversions: Backend.own_clock), timed in rounds beside the whole model so that a
slow spell of a shared machine scales both alike (measure.time_in_rounds). The fixed part is the
whole model's latency minus the summed latency of its original rows, so the table predicts the
original exactly and a pruned model as fixed + its rows; how well rows add up is checked by
measuring (benchmarks/RESULTS.md). On ort-cpu the original rows and the residual blocks' branches are then
read in situ instead: what their nodes' kernels take of profiled runs of the whole model (the reference runs
the rows are timed beside), since a row alone runs with the caches to itself. A fixed part below zero
means the rows were timed as slower than the network they come from: within a small tolerance it is clamped
to 0; beyond it the table is timed once more with twice the rounds (a slow spell of a shared machine passes),
and refused if it is still below.
A row is keyed by its signature: kernel, stride, groups, shapes and its activation with the
attributes that change it (a Clip(0, 1) row is not a Clip(0, 6) row). A table is JSON: it can be built
on the deployment device (``onnxprune latency``) and carried back; it is refused for another model,
or the same model exported at another input shape or dtype. With ``--ray`` the groups of rows are timed on Ray
actors, each beside the whole model on its own device (``time_groups``; onnxprune/scaleout/latency.py), and the
table says which actor timed which row (``timed_on``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune import outputs
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import Structure
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.graph.ops import ACTIVATION_ATTRS
from onnxprune.latency.backends import Backend, ProfiledClock, median_time, overhead_model
from onnxprune.latency.measure import random_feeds, time_in_rounds
from onnxprune.options import connected_to_ray
from onnxprune.planning.candidates import FittedMap, Option

# 3: rows carry their conv's groups and their activation's attributes; 2: rows are their own work, shares of
# the whole model timed in the same rounds
log = logging.getLogger(__name__)
TABLE_SCHEMA = 3
# A fixed part down to -5% of the whole model is noise (at batch 32 on ort-cpu the original rows of real models sum
# to nearly the whole, and a noisy round can tip them over): clamped to 0, with a note. Further below is refused.
FIXED_TOLERANCE = 0.05


@dataclass
class LatencyTable:
    backend: dict
    batch: int
    dtype: str
    fingerprint: str
    whole_s: float
    fixed_s: float
    rows: dict[str, float] = field(default_factory=dict)  # signature -> seconds
    rounds: int = 0  # rounds the rows were timed in, each beside the whole model
    notes: list[str] = field(default_factory=list)  # rows timed otherwise than they run, a clamped fixed part
    blocks: dict[str, float] = field(default_factory=dict)  # join -> seconds of the block's branch, its own work
    # join -> seconds of a block on the chain beyond its convs' rows (e.g. a ConvNeXt block's LayerNorm and
    # MatMuls): paid by the row that starts the block while the block stays, saved when it is removed
    block_extras: dict[str, float] = field(default_factory=dict)
    # seconds each graph node costs beyond its kernel (dispatch, allocation): the whole model's run beyond its
    # kernels and an empty model's run, shared out by node count; what a row's nodes add to its own work
    node_overhead_s: float = 0.0
    # chain conv -> [seconds its original row takes in situ, in profiled runs of the whole model; seconds that row
    # took timed alone]: read where the backend profiles the whole model (_read_in_situ)
    in_situ: dict[str, list[float]] = field(default_factory=dict)
    schema: int = TABLE_SCHEMA
    # signature (or "block JOIN") -> where it was timed, when rows were timed on Ray actors (scaleout.latency): the
    # host, Ray node and actor, and the backend's device; every row's share is of the whole model timed by the same
    # actor. Empty: every row timed in this process, on ``backend``'s device.
    timed_on: dict[str, str] = field(default_factory=dict)

    def option_latency(self, option: Option, structure: Structure) -> float:
        if option.keep_block is not None:
            return self.block_latency(option.keep_block, structure)
        signature = row_signature(option, structure, self.batch)
        if signature is None:
            return 0.0
        if signature not in self.rows:
            raise OnnxPruneError(f"the latency table has no row '{signature}' (convs {', '.join(option.keep)}): it was "
                                 "measured for other options of this model; measure it again with onnxprune latency")
        if option.fitted_map is not None:  # the map alone: its conv, or its MatMul and Add
            return self.rows[signature] + self.node_overhead_s * (1 if option.fitted_map.conv else 2)
        extras = sum(self.block_extras.get(join, 0.0) for a, b, join in chain_spans(structure)
                     if a == option.start and option.end <= b)
        nodes = 1 + len(structure.convs[option.end - 1].activation_nodes)  # the conv and its activation
        return self.row_seconds(option, structure, signature) + self.node_overhead_s * nodes + extras

    def row_seconds(self, option: Option, structure: Structure, signature: str) -> float:
        """A conv row's own seconds: in situ where the original network has the row, else as timed alone times
        what the network makes of the original rows it replaces (their seconds in situ / alone): a merge or a
        pruned conv runs where they ran. As timed alone where nothing was read in situ."""
        convs = [structure.convs[p].name for p in range(option.start, option.end)]
        if not all(name in self.in_situ for name in convs):
            return self.rows[signature]
        if option.original:
            return self.in_situ[convs[0]][0]
        situ, alone = (sum(self.in_situ[name][k] for name in convs) for k in (0, 1))
        return self.rows[signature] * situ / alone if alone > 0 else self.rows[signature]

    def block_latency(self, join: str, structure: Structure) -> float:
        """A block's branch as its own work, with the overhead of its nodes and of its join."""
        if join not in self.blocks:
            raise OnnxPruneError(f"the latency table has no row for block {join}: measure it again with "
                                 "onnxprune latency")
        block = next(b for b in structure.residual_blocks if b.join == join)
        return self.blocks[join] + self.node_overhead_s * (len(block.branch_nodes) + 1)

    def predict(self, options: list[Option], structure: Structure) -> float:
        return self.fixed_s + sum(self.option_latency(o, structure) for o in options)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return outputs.write_text(path, json.dumps(asdict(self), indent=1) + "\n")


def load_table(path: str | os.PathLike[str], fingerprint: str) -> LatencyTable:
    try:
        data = json.loads(Path(path).read_text())
        table = LatencyTable(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise OnnxPruneError(f"cannot read the latency table {path}: {exc}") from None
    if table.schema != TABLE_SCHEMA:
        raise OnnxPruneError(f"latency table {path} has schema {table.schema}; this onnxprune reads {TABLE_SCHEMA} "
                             "(measure it again with onnxprune latency)")
    if table.fingerprint != fingerprint:
        raise OnnxPruneError(f"latency table {path} was measured for another model or another input shape/dtype "
                             "(fingerprints differ): measure it again with onnxprune latency on this model")
    if table.fixed_s < 0:
        raise OnnxPruneError(f"latency table {path}: {negative_fixed_message(table.whole_s, table.fixed_s)}")
    return table


def negative_fixed_message(whole_s: float, fixed_s: float) -> str:
    """Why a fixed part below zero is refused, and what to try."""
    share = (whole_s - fixed_s) / whole_s if whole_s > 0 else float("inf")
    return (f"the original model's rows summed to {100 * share:.1f}% of the whole model's latency, so the fixed part "
            f"(everything outside the rows) came out at {1e3 * fixed_s:.4g} ms, below zero: the rows were timed as "
            "slower than the network they come from, a measurement problem (a slow spell of a shared machine, or a "
            "backend on which a conv alone costs more than inside the network). Measure it again with more --rounds, "
            "on a quieter machine, or on another backend")


class FixedPartBelowZero(OnnxPruneError):
    """The original rows were timed as slower than the whole model, beyond FIXED_TOLERANCE."""

    def __init__(self, whole_s: float, fixed_s: float) -> None:
        super().__init__(f"cannot build the latency table: {negative_fixed_message(whole_s, fixed_s)}")
        self.summary = f"the original rows summed to {100 * (whole_s - fixed_s) / whole_s:.1f}% of the whole model"


def fixed_part(whole_s: float, rows_s: float) -> tuple[float, str | None]:
    """(fixed seconds, a note or None) for a whole model of ``whole_s`` whose original rows sum to ``rows_s``:
    a fixed part below zero within FIXED_TOLERANCE of the whole is clamped to 0 with a note, further below
    it is a FixedPartBelowZero."""
    fixed = whole_s - rows_s
    if fixed >= 0:
        return fixed, None
    if fixed < -FIXED_TOLERANCE * whole_s:
        raise FixedPartBelowZero(whole_s, fixed)
    return 0.0, (f"the original rows summed to {100 * rows_s / whole_s:.1f}% of the whole model: the fixed part "
                 f"({1e3 * fixed:.4g} ms, within {100 * FIXED_TOLERANCE:g}% of the whole) was clamped to 0")


def _row_shape(option: Option, structure: Structure, batch: int) -> tuple[list[int], list[int], int]:
    if option.fitted_map is not None:  # a map keeps its tensor's shape: channels in, the same channels out
        shape = [batch, *option.fitted_map.shape]
        channels = option.fitted_map.shape[option.fitted_map.axis]
        return shape, [d for i, d in enumerate(option.fitted_map.shape) if i != option.fitted_map.axis], channels
    first, last = structure.convs[option.start], structure.convs[option.end - 1]
    if first.input_shape is None or last.output_shape is None:
        raise OnnxPruneError(f"conv {first.name}: latency tables need static channel and spatial sizes")
    in_shape = [batch] + list(first.input_shape[1:])
    out_spatial = list(last.output_shape[2:])
    if not all(isinstance(d, int) for d in in_shape[1:] + out_spatial):
        raise OnnxPruneError(f"conv {first.name}: latency tables need static channel and spatial sizes: give the "
                             "model's input sizes with --input-shape")
    return in_shape, out_spatial, last.out_channels


def _conv_groups(option: Option, cin: int, cout: int) -> int:
    """The groups of the row's conv: all its input channels when depthwise, else the option's."""
    groups = cin if option.depthwise else option.groups
    if groups < 1 or cin % groups or cout % groups:
        raise OnnxPruneError(f"conv {option.keep[0] if option.keep else option.start}: {groups} groups do not divide "
                             f"{cin} input and {cout} output channels")
    return groups


def activation_text(kind: str | None, attrs: dict) -> str:
    """An activation as a signature writes it: ``LeakyRelu(alpha=0.01)``, ``Clip(max=1,min=0)``, ``Relu``, ``none``."""
    if kind is None:
        return "none"

    def value(v) -> str:
        if isinstance(v, float):
            return format(v, ".6g")
        return "x".join(map(str, v)) if isinstance(v, list) else str(v)

    inner = ",".join(f"{k}={value(attrs[k])}" for k in sorted(attrs))
    return f"{kind}({inner})" if inner else kind


def chain_spans(structure: Structure) -> list[tuple[int, int, str]]:
    """(first position, last position, join) of every identity block whose branch holds chain convs s..e-1."""
    blocks = structure.residual_blocks
    return [(span["source"] + 1, span["target"] + 1, blocks[span["block"]].join) for span in structure.spans
            if blocks[span["block"]].shortcut == "identity"]


def row_signature(option: Option, structure: Structure, batch: int) -> str | None:
    """What determines a conv row's latency; None for a removed block (it costs nothing), one replaced by a map
    that folds into its neighbour (nor does it), or a kept one (its branch is timed as a whole:
    LatencyTable.blocks). A block replaced by a map that does not fold has the map's row: ``map conv k1`` (channels
    first) or ``map matmul`` (channels last) at the tensor's shape."""
    if option.fitted_map is not None and not option.fitted_map.folds:
        kind = "conv k1" if option.fitted_map.conv else "matmul"
        return f"map {kind} {[batch, *option.fitted_map.shape]}"
    if option.remove_block is not None or option.keep_block is not None:
        return None
    in_shape, out_spatial, cout = _row_shape(option, structure, batch)
    groups = _conv_groups(option, in_shape[1], cout)
    last = structure.convs[option.end - 1]
    act = activation_text(last.activation, last.activation_attrs)
    kernel = "x".join(map(str, option.kernel))
    stride = "x".join(map(str, option.stride))
    return f"conv k{kernel} s{stride} g{groups} {in_shape}->{cout}x{'x'.join(map(str, out_spatial))} {act}"


# An activation's nodes from x to y and the constants they read (float64 here, cast to the row's dtype).
_Built = tuple[list[onnx.NodeProto], dict[str, np.ndarray]]


def _op(op: str) -> Callable[[dict, str, str, int], _Built]:
    """One activation op, with the attributes it takes (ops.ACTIVATION_ATTRS) from the row's, else ONNX defaults."""
    def build(attrs: dict, x: str, y: str, cout: int) -> _Built:
        known = {k: float(attrs.get(k, v)) for k, v in ACTIVATION_ATTRS.get(op, {}).items()}
        return [helper.make_node(op, [x], [y], **known)], {}
    return build


def _clip(attrs: dict, x: str, y: str, cout: int) -> _Built:
    low, high = attrs.get("min", 0.0), attrs.get("max", 6.0)
    consts = {name: np.array(v, np.float64) for name, v in (("act_min", low), ("act_max", high)) if v is not None}
    inputs = [x, "act_min" if low is not None else "", "act_max" if high is not None else ""]
    while inputs[-1] == "":
        inputs.pop()
    return [helper.make_node("Clip", inputs, [y])], consts


def _prelu(attrs: dict, x: str, y: str, cout: int) -> _Built:
    shape = attrs.get("slope_shape") or [cout, 1, 1]
    return [helper.make_node("PRelu", [x, "act_slope"], [y])], {"act_slope": np.full(shape, 0.25)}


def _silu(attrs: dict, x: str, y: str, cout: int) -> _Built:
    return [helper.make_node("Sigmoid", [x], ["act_s"]), helper.make_node("Mul", [x, "act_s"], [y])], {}


def _mish(attrs: dict, x: str, y: str, cout: int) -> _Built:
    """x * tanh(softplus(x)): the Mish op needs opset 18, row models are opset 17."""
    return [helper.make_node("Softplus", [x], ["act_sp"]), helper.make_node("Tanh", ["act_sp"], ["act_t"]),
            helper.make_node("Mul", [x, "act_t"], [y])], {}


def _gelu(attrs: dict, x: str, y: str, cout: int) -> _Built:
    """x * (1 + erf(x / sqrt 2)) / 2, or its tanh approximation when ``attrs`` say so (the Gelu op needs opset 20)."""
    node = helper.make_node
    if attrs.get("approximate") == "tanh":  # tanh(sqrt(2 / pi) * (x + 0.044715 x^3))
        nodes = [node("Pow", [x, "act_three"], ["act_p"]), node("Mul", ["act_p", "act_c"], ["act_q"]),
                 node("Add", [x, "act_q"], ["act_r"]), node("Mul", ["act_r", "act_k"], ["act_u"]),
                 node("Tanh", ["act_u"], ["act_e"])]
        consts = {"act_three": 3.0, "act_c": 0.044715, "act_k": (2 / np.pi) ** 0.5}
    else:
        nodes = [node("Div", [x, "act_sqrt2"], ["act_d"]), node("Erf", ["act_d"], ["act_e"])]
        consts = {"act_sqrt2": 2**0.5}
    nodes += [node("Add", ["act_e", "act_one"], ["act_a"]), node("Mul", [x, "act_a"], ["act_m"]),
              node("Mul", ["act_m", "act_half"], [y])]
    consts.update(act_one=1.0, act_half=0.5)
    return nodes, {name: np.array(v, np.float64) for name, v in consts.items()}


ACTIVATIONS: dict[str, Callable[[dict, str, str, int], _Built]] = {
    "Relu": _op("Relu"), "ReLU6": _clip, "Clip": _clip, "LeakyRelu": _op("LeakyRelu"), "PRelu": _prelu,
    "HardSwish": _op("HardSwish"), "HardSigmoid": _op("HardSigmoid"), "Sigmoid": _op("Sigmoid"), "Tanh": _op("Tanh"),
    "SiLU": _silu, "Gelu": _gelu, "Mish": _mish, "Elu": _op("Elu"), "Selu": _op("Selu"), "Celu": _op("Celu"),
    "Softplus": _op("Softplus"), "ThresholdedRelu": _op("ThresholdedRelu"),
}


def row_model(option: Option, structure: Structure, batch: int, dtype=np.float32) -> onnx.ModelProto:
    """A model of the row alone: the (merged) conv, with its groups, and the activation after it as it is in the
    network (ACTIVATIONS; an activation it does not know is left out: build_table notes it), random weights. A
    block replaced by a fitted map: the map alone (``map_model``)."""
    if option.fitted_map is not None:
        return map_model(option.fitted_map, batch, dtype)
    in_shape, out_spatial, cout = _row_shape(option, structure, batch)
    cin = in_shape[1]
    groups = _conv_groups(option, cin, cout)
    pads_begin, pads_end = [], []
    for i, o, k, s in zip(in_shape[2:], out_spatial, option.kernel, option.stride):
        total = max(0, (o - 1) * s + k - i)
        pads_begin.append(total // 2)
        pads_end.append(total - total // 2)
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, (cout, cin // groups, *option.kernel)).astype(dtype)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(cout, dtype), "b")]
    last = structure.convs[option.end - 1]
    build = ACTIVATIONS.get(last.activation or "")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if build else "y"], kernel_shape=list(option.kernel),
                              strides=list(option.stride), pads=pads_begin + pads_end, group=groups)]
    if build is not None:
        act_nodes, consts = build(last.activation_attrs, "c", "y", cout)
        nodes += act_nodes
        inits += [numpy_helper.from_array(np.asarray(v).astype(dtype), name) for name, v in consts.items()]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "row", [helper.make_tensor_value_info("x", elem, in_shape)],
                              [helper.make_tensor_value_info("y", elem, [batch, cout, *out_spatial])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def map_model(fitted: FittedMap, batch: int, dtype=np.float32) -> onnx.ModelProto:
    """A model of a fitted map alone, as repair/place.py inserts it: a 1x1 conv with a bias (channels first), or a
    MatMul and an Add (channels last), at the tensor's shape with ``batch`` samples, random weights."""
    shape = [batch, *fitted.shape]
    channels = fitted.shape[fitted.axis]
    rng = np.random.default_rng(0)
    node = helper.make_node
    if fitted.conv:
        weight = rng.normal(0, 0.1, (channels, channels, *[1] * (len(shape) - 2)))
        nodes = [node("Conv", ["x", "w", "b"], ["y"])]
    else:
        weight = rng.normal(0, 0.1, (channels, channels))
        nodes = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["y"])]
    inits = [numpy_helper.from_array(weight.astype(dtype), "w"),
             numpy_helper.from_array(np.zeros(channels, dtype), "b")]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "map", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@dataclass(frozen=True)
class TimedRow:
    """A model timed as its own work beside the whole model: a row (``key``: its signature) or a residual block's
    branch (``key``: "block JOIN"), as a ModelProto or serialized; ``feeds`` None: ``random_feeds`` at the batch."""

    key: str
    model: onnx.ModelProto | bytes
    feeds: dict[str, np.ndarray] | None = None


class GroupTimer:
    """The whole model on a backend, kept ready to time groups of rows beside it (measure.time_in_rounds): what
    one process keeps between groups, and what each Ray actor keeps (scaleout.latency; docs/scale-out.md)."""

    def __init__(self, model: onnx.ModelProto | bytes, backend: Backend, batch: int, rounds: int = 20,
                 warmup: int = 3) -> None:
        self.model = onnx.load_from_string(model) if isinstance(model, bytes) else model
        self.backend, self.batch, self.rounds, self.warmup = backend, batch, rounds, warmup
        self.feeds = random_feeds(self.model, batch)
        self.whole_run = backend.runner(self.model, self.feeds)
        self.reference = backend.reference_runner(self.model, self.feeds)

    def time(self, rows: list[TimedRow]) -> tuple[float, list[float], str]:
        """(the whole model's median seconds, each row's own seconds, where they were timed), the rows timed in
        rounds beside the whole model."""
        clocks = []
        for row in rows:
            model = onnx.load_from_string(row.model) if isinstance(row.model, bytes) else row.model
            clocks.append(self.backend.own_clock(model, row.feeds if row.feeds is not None
                                                 else random_feeds(model, self.batch)))
        whole_s, own = time_in_rounds(self.whole_run, self.reference, clocks, self.rounds, self.warmup)
        return whole_s, own, self.where()

    def whole_seconds(self) -> float:
        """The whole model's median seconds, alone."""
        return median_time(self.whole_run, self.warmup, self.rounds)

    def node_overhead(self) -> float:
        """Per graph node, the share of the whole model's run that is no kernel's work (``_node_overhead``)."""
        return _node_overhead(self.model, self.backend, self.reference, self.feeds, self.rounds)

    def node_shares(self) -> dict[str, float]:
        """Graph node -> the share of the whole model's run its kernels take in situ, read from every profiled run
        of the whole model so far (ProfiledClock.node_shares; it ends the profile); empty on backends without
        a profiler."""
        return self.reference.node_shares() if isinstance(self.reference, ProfiledClock) else {}

    def describe(self) -> dict:
        return self.backend.describe()

    def where(self) -> str:
        """Where this timer times (its backend's device; a Ray actor adds its host, node and actor)."""
        return self.backend.device


@dataclass
class GroupTimes:
    """What timing every group gave: each row's share of its group's whole model, the whole model's median over the
    groups, the per-node overhead as a share of the whole, where each row was timed, the backend that timed, and
    each graph node's share of the whole model's run in situ (GroupTimer.node_shares; empty: not read)."""

    shares: dict[str, float]
    whole_s: float
    node_overhead: float
    timed_on: dict[str, str]
    backend: dict
    node_shares: dict[str, float] = field(default_factory=dict)


def time_groups(model: onnx.ModelProto, backend: Backend, groups: list[list[str]], build: Callable[[str], TimedRow],
                batch: int, rounds: int, warmup: int) -> GroupTimes:
    """Time each group of keys (``build(key)`` makes its row, a group at a time) beside the whole model, in this
    process or, inside ``onnxprune.scaleout.cluster.connect``, on Ray actors (scaleout.latency)."""
    if connected_to_ray():
        from onnxprune.scaleout.latency import time_groups_on_ray

        return time_groups_on_ray(model, backend, groups, build, batch, rounds, warmup)
    timer = GroupTimer(model, backend, batch, rounds, warmup)
    shares: dict[str, float] = {}
    wholes: list[float] = []
    for keys in groups:
        whole_s, own, _ = timer.time([build(key) for key in keys])
        wholes.append(whole_s)
        shares.update((key, seconds / whole_s) for key, seconds in zip(keys, own))
        log.info(f"latency: timed {len(shares)}/{sum(map(len, groups))} rows and blocks on {backend.name}")
    whole = float(np.median(wholes)) if wholes else timer.whole_seconds()
    overhead = timer.node_overhead()  # before node_shares, which ends the reference's profile
    return GroupTimes(shares, whole, overhead, {}, backend.describe(), timer.node_shares())


def build_table(model: onnx.ModelProto, structure: Structure, options: list[Option], backend: Backend, batch: int,
                fingerprint: str, warmup: int = 3, rounds: int = 20, group_bytes: int = 2 << 30,
                in_situ: bool = True) -> LatencyTable:
    """Time every distinct row of ``options`` (its own work: Backend.own_clock) and the whole model on
    ``backend`` at ``batch``, the rows in rounds beside the whole model (measure.time_in_rounds).

    Rows are timed in groups whose input and output tensors stay under ``group_bytes`` together (the
    sessions of a group live at once), each group beside the whole model and scaled to one whole; the residual
    blocks' branches in a group of their own. Inside ``scaleout.cluster.connect``, on Ray actors (time_groups).
    With ``in_situ``, where the backend profiles the whole model (ort-cpu, in this process), the original rows and
    the blocks take what their nodes take of its runs (_read_in_situ). Original rows that sum to more than the
    whole model (fixed_part) are timed once more, with twice the rounds, before the table is refused."""
    timing = (model, structure, options, backend, batch, fingerprint, warmup)
    try:
        return _timed_table(*timing, rounds, group_bytes, in_situ)
    except FixedPartBelowZero as exc:
        log.warning(f"latency: {exc.summary}; timing the rows again with {2 * rounds} rounds")
        table = _timed_table(*timing, 2 * rounds, group_bytes, in_situ)
        table.notes.append(f"timed twice: in the first timing ({rounds} rounds) {exc.summary}")
        return table


def _timed_table(model: onnx.ModelProto, structure: Structure, options: list[Option], backend: Backend, batch: int,
                 fingerprint: str, warmup: int, rounds: int, group_bytes: int, in_situ: bool) -> LatencyTable:
    """One timing of the table ``build_table`` describes."""
    feeds = random_feeds(model, batch)
    dtype = next(iter(feeds.values())).dtype
    row_dtype = dtype.type if np.issubdtype(dtype, np.floating) else np.float32
    distinct: dict[str, Option] = {}
    for option in options:
        signature = row_signature(option, structure, batch)
        if signature is not None and signature not in distinct:
            distinct[signature] = option
    removable = {o.remove_block or o.keep_block for o in options} - {None}
    branches = block_models(model, [b for b in structure.residual_blocks if b.join in removable], feeds)

    def build(key: str) -> TimedRow:
        if key.startswith("block "):
            return TimedRow(key, *branches[key.removeprefix("block ")])
        return TimedRow(key, row_model(distinct[key], structure, batch, row_dtype))

    groups = _groups(distinct, structure, batch, np.dtype(row_dtype).itemsize, group_bytes)
    groups += [[f"block {join}" for join in branches]] if branches else []
    timed = time_groups(model, backend, groups, build, batch, rounds, warmup)
    shares, whole = timed.shares, timed.whole_s
    node_overhead = timed.node_overhead * whole
    rows = {signature: share * whole for signature, share in shares.items() if not signature.startswith("block ")}
    originals = [o for o in options if o.original]
    table = LatencyTable(timed.backend, batch, str(dtype), fingerprint, whole, 0.0, rows, rounds,
                         _untimed_activations(distinct, structure),
                         blocks={join: shares[f"block {join}"] * whole for join in branches},
                         node_overhead_s=node_overhead, timed_on=timed.timed_on)
    read = _read_in_situ(table, timed.node_shares, structure, originals) if in_situ else None
    table.notes += [read] if read else []
    table.block_extras = _block_extras(table, structure, originals)
    for _ in range(8):  # the overhead estimate is noisy on small models: never let it push the rows past the whole
        if table.node_overhead_s == 0 or sum(table.option_latency(o, structure) for o in originals) <= whole:
            break
        table.node_overhead_s /= 2
        table.block_extras = _block_extras(table, structure, originals)
    else:
        table.node_overhead_s = 0.0
        table.block_extras = _block_extras(table, structure, originals)
    if table.node_overhead_s < node_overhead:
        table.notes.append(f"per-node overhead lowered from {1e6 * node_overhead:.3g} to "
                           f"{1e6 * table.node_overhead_s:.3g} us so that the original rows fit in the whole model")
    table.fixed_s, note = fixed_part(whole, sum(table.option_latency(o, structure) for o in originals))
    table.notes += [note] if note else []
    return table


def block_models(model: onnx.ModelProto, blocks: list, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """join -> (a model of the block's branch alone, its inputs): the nodes from the block's input to its branch
    output (runtime.capture.suffix_model), fed with the tensors of one run of the whole model on ``feeds``."""
    from onnxprune.runtime.capture import suffix_model, with_outputs
    from onnxprune.runtime.session import create_session

    base = to_model(to_graph(model), model)  # normalized: tensor names as the analysis has them
    parts = {b.join: suffix_model(base, b.input, [b.branch_output]) for b in blocks}
    wanted = sorted({name for b in blocks for name in (b.input, *parts[b.join][1]) if name not in feeds})
    if not parts:
        return {}
    session = create_session(with_outputs(base, wanted), "cpu")
    values = {**feeds, **dict(zip(session.output_names, session.run(feeds)))}
    return {b.join: (parts[b.join][0], {name: values[name] for name in (b.input, *parts[b.join][1])})
            for b in blocks}


def _node_overhead(model: onnx.ModelProto, backend: Backend, reference, feeds: dict[str, np.ndarray],
                   rounds: int) -> float:
    """Per graph node, the share of the whole model's run that is no kernel's work: (run - kernels - an empty
    model's run) / run / nodes, from the reference run (the profiled whole model on ort-cpu). 0 where the
    reference says nothing of its kernels (the GPU backends' clocks already subtract an empty model's run)."""
    if not hasattr(reference, "seconds"):
        return 0.0
    wall = median_time(reference, 1, rounds)
    kernels = float(np.median(reference.seconds()[-rounds:]))
    empty_input = next(iter(feeds.values()))
    empty = median_time(backend.runner(overhead_model(feeds), {"x": empty_input}), 3, rounds)
    nodes = len(to_graph(model).nodes)
    return max(0.0, wall - kernels - empty) / wall / max(1, nodes)


def _read_in_situ(table: LatencyTable, shares: dict[str, float], structure: Structure,
                  originals: list[Option]) -> str | None:
    """Put into ``table`` what the original rows and the timed blocks' branches take of the whole model in situ:
    their nodes' ``shares`` of its run (GroupTimes.node_shares) times the whole (``LatencyTable.in_situ``, and
    ``blocks`` replaced). Timed alone, a row or a branch runs with the caches to itself, and what the original
    network spends on them was misjudged most where plans remove many blocks at batch 1 (docs/algorithms.md,
    section 4.3, "Rows in situ"); new rows are scaled by what the network makes of the rows they replace
    (LatencyTable.row_seconds). A note on what was read; None when nothing was (no shares: a backend without
    a profiler)."""
    if not shares:
        return None
    chain = [o for o in originals if o.keep_block is None]
    for o in chain:
        conv = structure.convs[o.start]
        share = sum(shares.get(name, 0.0) for name in (conv.name, *conv.activation_nodes))
        if share > 0:
            table.in_situ[conv.name] = [share * table.whole_s, table.rows[row_signature(o, structure, table.batch)]]
    read_blocks = 0
    for block in structure.residual_blocks:
        share = sum(shares.get(name, 0.0) for name in block.branch_nodes)
        if block.join in table.blocks and share > 0:
            table.blocks[block.join] = share * table.whole_s
            read_blocks += 1
    return (f"original rows and blocks read in situ, from profiled runs of the whole model: {len(table.in_situ)} of "
            f"{len(chain)} original rows, {read_blocks} of {len(table.blocks)} blocks")


def _block_extras(table: LatencyTable, structure: Structure, originals: list[Option]) -> dict[str, float]:
    """For each timed block on the chain, its branch's time beyond the original rows of its convs (never below 0)."""
    extras = {}
    for a, b, join in chain_spans(structure):
        if join in table.blocks:
            convs = sum(table.option_latency(o, structure) for o in originals
                        if o.keep_block is None and a <= o.start and o.end <= b)
            extras[join] = max(0.0, table.block_latency(join, structure) - convs)
    return extras


def _untimed_activations(distinct: dict[str, Option], structure: Structure) -> list[str]:
    """A note for each row whose activation has no row model (ACTIVATIONS): it was timed as the bare conv."""
    notes = []
    for signature, option in distinct.items():
        if option.fitted_map is not None:
            continue
        kind = structure.convs[option.end - 1].activation
        if kind is not None and kind not in ACTIVATIONS:
            notes.append(f"row '{signature}': no row model for the activation {kind}; timed as the bare conv")
    return notes


def _groups(distinct: dict[str, Option], structure: Structure, batch: int, itemsize: int,
            limit: int) -> list[list[str]]:
    """Signatures in groups whose row inputs and outputs take at most ``limit`` bytes together."""
    groups: list[list[str]] = [[]]
    used = 0
    for signature, option in distinct.items():
        in_shape, out_spatial, cout = _row_shape(option, structure, batch)
        size = itemsize * (int(np.prod(in_shape)) + batch * cout * int(np.prod(out_spatial)))
        if groups[-1] and used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append(signature)
        used += size
    return [g for g in groups if g]
