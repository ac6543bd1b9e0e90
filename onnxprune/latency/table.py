"""Latency tables for LayerMerge: one entry per distinct row (a conv with its trailing activation, at
its real input shape, batch and dtype), timed once on a backend, plus the fixed part of the network.

A row's latency is its own work, without what the whole network pays once rather than per conv
(the call, layout conversions: Backend.own_clock), timed in rounds beside the whole model so that a
slow spell of a shared machine scales both alike (measure.time_in_rounds). The fixed part is the
whole model's latency minus the summed latency of its original rows, so the table predicts the
original exactly and a pruned model as fixed + its rows; how well rows add up is checked by
measuring (benchmarks/RESULTS.md). A table is JSON: it can be built on
the deployment device (``onnxprune latency``) and carried back; it is refused for another model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import Structure
from onnxprune.latency.backends import Backend, median_time
from onnxprune.latency.measure import random_feeds, time_in_rounds
from onnxprune.planning.candidates import Option

TABLE_SCHEMA = 2  # 2: rows are their own work, shares of the whole model timed in the same rounds


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
    schema: int = TABLE_SCHEMA

    def option_latency(self, option: Option, structure: Structure) -> float:
        signature = row_signature(option, structure, self.batch)
        return 0.0 if signature is None else self.rows[signature]

    def predict(self, options: list[Option], structure: Structure) -> float:
        return self.fixed_s + sum(self.option_latency(o, structure) for o in options)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path


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
        raise OnnxPruneError(f"latency table {path} was measured for another model (fingerprints differ)")
    return table


def _row_shape(option: Option, structure: Structure, batch: int) -> tuple[list[int], list[int], int]:
    first, last = structure.convs[option.start], structure.convs[option.end - 1]
    if first.input_shape is None or last.output_shape is None:
        raise OnnxPruneError(f"conv {first.name}: latency tables need static channel and spatial sizes")
    in_shape = [batch] + list(first.input_shape[1:])
    out_spatial = list(last.output_shape[2:])
    if not all(isinstance(d, int) for d in in_shape[1:] + out_spatial):
        raise OnnxPruneError(f"conv {first.name}: latency tables need static channel and spatial sizes")
    return in_shape, out_spatial, last.out_channels


def row_signature(option: Option, structure: Structure, batch: int) -> str | None:
    """What determines a row's latency; None for a removed block (it costs nothing)."""
    if option.remove_block is not None:
        return None
    in_shape, out_spatial, cout = _row_shape(option, structure, batch)
    groups = in_shape[1] if option.depthwise else 1
    act = structure.convs[option.end - 1].activation or "none"
    kernel = "x".join(map(str, option.kernel))
    stride = "x".join(map(str, option.stride))
    return f"conv k{kernel} s{stride} g{groups} {in_shape}->{cout}x{'x'.join(map(str, out_spatial))} {act}"


_ACTIVATION_NODES: dict[str, Callable] = {
    "Relu": lambda x, y: [helper.make_node("Relu", [x], [y])],
    "ReLU6": lambda x, y: [helper.make_node("Clip", [x, "zero", "six"], [y])],
    "Clip": lambda x, y: [helper.make_node("Clip", [x, "zero", "six"], [y])],
    "HardSwish": lambda x, y: [helper.make_node("HardSwish", [x], [y])],
    "HardSigmoid": lambda x, y: [helper.make_node("HardSigmoid", [x], [y])],
    "Sigmoid": lambda x, y: [helper.make_node("Sigmoid", [x], [y])],
    "Tanh": lambda x, y: [helper.make_node("Tanh", [x], [y])],
    "SiLU": lambda x, y: [helper.make_node("Sigmoid", [x], ["s"]), helper.make_node("Mul", [x, "s"], [y])],
    "Gelu": lambda x, y: [helper.make_node("Div", [x, "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                          helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", [x, "a"], ["m"]),
                          helper.make_node("Mul", ["m", "half"], [y])],
}


def row_model(option: Option, structure: Structure, batch: int, dtype=np.float32) -> onnx.ModelProto:
    """A model of the row alone: the (merged) conv and the activation after it, random weights."""
    in_shape, out_spatial, cout = _row_shape(option, structure, batch)
    cin = in_shape[1]
    groups = cin if option.depthwise else 1
    pads_begin, pads_end = [], []
    for i, o, k, s in zip(in_shape[2:], out_spatial, option.kernel, option.stride):
        total = max(0, (o - 1) * s + k - i)
        pads_begin.append(total // 2)
        pads_end.append(total - total // 2)
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, (cout, cin // groups, *option.kernel)).astype(dtype)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(cout, dtype), "b")]
    for name, value in (("zero", 0.0), ("six", 6.0), ("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5)):
        inits.append(numpy_helper.from_array(np.array(value, dtype), name))
    act = structure.convs[option.end - 1].activation
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if act in _ACTIVATION_NODES else "y"],
                              kernel_shape=list(option.kernel), strides=list(option.stride),
                              pads=pads_begin + pads_end, group=groups)]
    if act in _ACTIVATION_NODES:
        nodes += _ACTIVATION_NODES[act]("c", "y")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "row", [helper.make_tensor_value_info("x", elem, in_shape)],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def build_table(model: onnx.ModelProto, structure: Structure, options: list[Option], backend: Backend, batch: int,
                fingerprint: str, warmup: int = 3, rounds: int = 20, group_bytes: int = 2 << 30,
                progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Time every distinct row of ``options`` (its own work: Backend.own_clock) and the whole model on
    ``backend`` at ``batch``, the rows in rounds beside the whole model (measure.time_in_rounds).

    Rows are timed in groups whose input and output tensors stay under ``group_bytes`` together (the
    sessions of a group live at once), each group beside the whole model and scaled to one whole."""
    say = progress or (lambda _m: None)
    feeds = random_feeds(model, batch)
    dtype = next(iter(feeds.values())).dtype
    row_dtype = dtype.type if np.issubdtype(dtype, np.floating) else np.float32
    distinct: dict[str, Option] = {}
    for option in options:
        signature = row_signature(option, structure, batch)
        if signature is not None and signature not in distinct:
            distinct[signature] = option
    whole_run, reference = backend.runner(model, feeds), backend.reference_runner(model, feeds)
    shares: dict[str, float] = {}  # signature -> row seconds / whole seconds, within its group's rounds
    wholes: list[float] = []
    for group in _groups(distinct, structure, batch, np.dtype(row_dtype).itemsize, group_bytes):
        clocks = []
        for signature in group:
            row = row_model(distinct[signature], structure, batch, row_dtype)
            clocks.append(backend.own_clock(row, random_feeds(row, batch)))
        whole_s, own = time_in_rounds(whole_run, reference, clocks, rounds, warmup)
        wholes.append(whole_s)
        shares.update((signature, seconds / whole_s) for signature, seconds in zip(group, own))
        say(f"latency: timed {len(shares)}/{len(distinct)} distinct rows on {backend.name}")
    whole = float(np.median(wholes)) if wholes else median_time(whole_run, warmup, rounds)
    rows = {signature: share * whole for signature, share in shares.items()}
    originals = [o for o in options if o.original]
    table = LatencyTable(backend.describe(), batch, str(dtype), fingerprint, whole, 0.0, rows, rounds)
    table.fixed_s = whole - sum(table.option_latency(o, structure) for o in originals)
    return table


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
