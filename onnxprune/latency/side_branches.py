"""Latency rows timed inside the network: each row attached to the whole model as a side branch.

A row timed alone, run after run, finds its weights and its input in the caches; inside the network the
layers before it have evicted them, and a row costs more there, a large merged conv most (docs/latency.md,
"Rows timed inside the network"). So on ``ort-cpu`` (the backend whose profiler times each node) the conv
rows of a group are attached to the whole model: each row's nodes read the tensor that the row reads in a
pruned model, right after that tensor's producer, and its output becomes an extra graph output, so nothing
prunes it. A row's own work is the kernel time the profiler gives its nodes (``ProfiledClock`` parts, one
node-name prefix per row) in a run of the whole model with the group attached.
"""

from __future__ import annotations

import onnx
from onnx import helper


def row_prefix(k: int) -> str:
    """The prefix of every node, tensor and weight name of the ``k``-th attached row."""
    return f"onnxprune_row{k}__"


def attach(model: onnx.ModelProto, rows: list[tuple[onnx.ModelProto, str]]) -> onnx.ModelProto:
    """``model`` with each (row model, tensor of ``model``) attached as a side branch: the row's one input is that
    tensor, its other names take ``row_prefix(k)``, its nodes follow the tensor's producer (or start the graph, for a
    graph input or a weight) and its output is a graph output of the result."""
    joined = onnx.ModelProto()
    joined.CopyFrom(model)
    graph = joined.graph
    produced = {name for node in graph.node for name in node.output}
    after: dict[str, list[onnx.NodeProto]] = {}
    for k, (row, source) in enumerate(rows):
        prefix = row_prefix(k)
        row_input = row.graph.input[0].name
        rename = {row_input: source}

        def name(tensor: str) -> str:
            return rename.get(tensor, prefix + tensor) if tensor else tensor

        for weight in row.graph.initializer:
            graph.initializer.append(weight)
            graph.initializer[-1].name = name(weight.name)
        nodes = []
        for i, node in enumerate(row.graph.node):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{prefix}{node.name or i}"
            copy.input[:] = [name(x) for x in node.input]
            copy.output[:] = [name(y) for y in node.output]
            nodes.append(copy)
        after.setdefault(source if source in produced else "", []).extend(nodes)
        out = row.graph.output[0]
        graph.output.append(helper.make_value_info(name(out.name), out.type))
    ordered = list(after.get("", []))
    for node in graph.node:
        ordered.append(node)
        for output in node.output:
            ordered.extend(after.get(output, []))
    graph.ClearField("node")
    graph.node.extend(ordered)
    return joined
