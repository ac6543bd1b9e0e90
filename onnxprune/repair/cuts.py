"""Where a pruned model differs from its original: the cuts a repair map goes into (docs/algorithms.md
section 8).

Every rewrite that removes something (a residual block, a run of blocks, a conv, an activation) leaves
the nodes after it reading an earlier tensor: a node that read ``y`` in the original now reads ``x``.
Node names survive the rewrites, so the cuts are found by comparing the two graphs, whatever method
pruned the model and whether or not its plan is at hand: a cut is a pair (x, y) with the inputs of
the pruned model that read x where the original read y. A run of removed blocks is one cut.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import onnx

from onnxprune.graph.analysis import Structure

CHANNEL_FIRST_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
                     "GlobalMaxPool", "InstanceNormalization", "LpPool", "Resize", "Upsample"}


@dataclass(frozen=True)
class Cut:
    """Inputs ``readers`` ((node name, input index) of the pruned model) read ``source`` where the original's
    read ``target``; the map is fitted on channel axis ``axis`` (1 for channel-first tensors, else the last)."""

    source: str
    target: str
    readers: tuple[tuple[str, int], ...]
    axis: int


def find_cuts(pruned: onnx.ModelProto, original: onnx.ModelProto) -> tuple[list[Cut], list[str]]:
    """The cuts, in the pruned graph's order, and notes on differences that are not cuts (skipped)."""
    theirs = {n.name: n for n in original.graph.node if n.name}
    found: dict[tuple[str, str], list[tuple[str, int]]] = {}
    notes: list[str] = []
    for node in pruned.graph.node:
        if node.name in theirs:
            before = theirs[node.name]
            if before.op_type != node.op_type or len(before.input) != len(node.input):
                continue  # a rewritten node (a merged conv keeps its name): not a cut
            for k, (now, then) in enumerate(zip(node.input, before.input)):
                if now != then and now and then:
                    found.setdefault((now, then), []).append((node.name, k))
        elif node.op_type == "Identity" and node.output[0] in _outputs(original) and node.input[0] != node.output[0]:
            found.setdefault((node.input[0], node.output[0]), []).append((node.name, 0))  # a bypassed graph output
    ranks, dims = _value_ranks(pruned), _value_ranks(original)
    cuts = []
    for (source, target), readers in found.items():
        if dims.get(target) is None or ranks.get(source) is None:
            notes.append(f"cut {source} -> {target} skipped: the shape of one side is unknown")
            continue
        if len(dims[target]) != len(ranks[source]) or len(dims[target]) < 2:
            notes.append(f"cut {source} -> {target} skipped: the tensors have different ranks")
            continue
        rank = len(dims[target])
        axis = 1 if rank >= 4 or _channel_first(original, target) or _channel_first(pruned, source) else rank - 1
        same = [a == b for i, (a, b) in enumerate(zip(ranks[source], dims[target])) if i not in (0, axis)]
        if not all(same):
            notes.append(f"cut {source} -> {target} skipped: shapes {ranks[source]} and {dims[target]} differ "
                         "beyond the channels")
            continue
        cuts.append(Cut(source, target, tuple(readers), axis))
    return cuts, notes


def covered_blocks(cut: Cut, structure: Structure) -> list[str]:
    """The joins of the removed blocks a cut stands for, last first: walking back from its target through the
    blocks whose output each tensor is, to its source; [] for a cut that is no run of removed blocks (a dropped
    activation or conv). ``structure``: the original's analysis (``analyze_model``)."""
    by_output = {b.output: b for b in structure.residual_blocks}
    joins, tensor = [], cut.target
    while tensor != cut.source and tensor in by_output and by_output[tensor].input is not None:
        joins.append(by_output[tensor].join)
        tensor = by_output[tensor].input
    return joins if tensor == cut.source else []


def cuts_of_blocks(cuts: list[Cut], structure: Structure, joins: Collection[str]) -> list[Cut]:
    """The cuts that stand for at least one of the removed blocks ``joins`` (a run of removed blocks is one cut: it
    gets its map when any of them is named), in the order of ``cuts``."""
    wanted = set(joins)
    return [cut for cut in cuts if wanted.intersection(covered_blocks(cut, structure))]


def _outputs(model: onnx.ModelProto) -> set[str]:
    return {o.name for o in model.graph.output}


def _value_ranks(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> its dims (an int, or the symbol's name) for every tensor with a known shape."""
    shapes = {}
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = info.type.tensor_type
        if t.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    return shapes


def _channel_first(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether an op that reads or writes ``tensor`` has channels on axis 1 (a conv, a pool, a norm of images)."""
    for node in model.graph.node:
        if node.op_type in CHANNEL_FIRST_OPS and (tensor in node.input[:1] or tensor in node.output[:1]):
            return True
    return False
