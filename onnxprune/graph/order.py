"""Topological order of an onnx-graphsurgeon graph, stable and in O(N log N).

onnx-graphsurgeon's ``Graph.toposort`` computes every node's depth recursively and sorts by it; on
graphs of a few hundred nodes that took about a third of a LayerMerge search, which rewrites the
whole graph once per candidate. Here: Kahn's algorithm, always taking the ready node that came
first in the current order, so an already sorted graph keeps its order exactly. Graphs with
subgraphs (If, Loop, Scan) go to onnx-graphsurgeon, which also orders the subgraphs and knows
what they read from the outer scope.
"""

from __future__ import annotations

import heapq

import onnx_graphsurgeon as gs


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort ``graph.nodes`` in place so that every node comes after the producers of its inputs; returns it.
    Raises ValueError on a cycle."""
    nodes = graph.nodes
    if any(_has_subgraph(node) for node in nodes):
        return graph.toposort()
    position = {id(node): k for k, node in enumerate(nodes)}
    waiting = [0] * len(nodes)  # per node: inputs whose producer is not placed yet
    readers: list[list[int]] = [[] for _ in nodes]
    for k, node in enumerate(nodes):
        producers = {position[id(p)] for t in node.inputs for p in t.inputs if id(p) in position}
        producers.discard(k)
        waiting[k] = len(producers)
        for p in producers:
            readers[p].append(k)
    ready = [k for k, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for r in readers[k]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        stuck = [nodes[k].name for k, count in enumerate(waiting) if count > 0][:5]
        raise ValueError(f"the graph has a cycle through nodes {stuck}")
    graph.nodes = order
    return graph


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(value, gs.Graph) or (isinstance(value, list) and value and isinstance(value[0], gs.Graph))
               for value in node.attrs.values())
