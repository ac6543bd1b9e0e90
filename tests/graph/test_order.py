import random

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.graph.order import toposort


def random_dag(sizes: list[int], seed: int) -> gs.Graph:
    """Node k reads up to three earlier tensors (graph input, constants or earlier nodes' outputs)."""
    rng = random.Random(seed)
    x = gs.Variable("x", np.float32, [1])
    tensors = [x, gs.Constant("c", np.ones(1, np.float32))]
    nodes = []
    for k, fan_in in enumerate(sizes):
        inputs = [rng.choice(tensors) for _ in range(1 + fan_in % 3)]
        out = gs.Variable(f"t{k}", np.float32, [1])
        nodes.append(gs.Node("Sum", name=f"n{k}", inputs=inputs, outputs=[out]))
        tensors.append(out)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[tensors[-1]])


def is_sorted(graph: gs.Graph) -> bool:
    seen: set[int] = set()
    for node in graph.nodes:
        if any(id(p) not in seen for t in node.inputs for p in t.inputs):
            return False
        seen.add(id(node))
    return True


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(0, 10**6))
def test_a_shuffled_graph_comes_out_in_an_order_that_respects_every_edge(sizes, seed):
    graph = random_dag(sizes, seed)
    original = list(graph.nodes)
    random.Random(seed).shuffle(graph.nodes)
    assert toposort(graph) is graph
    assert is_sorted(graph) and sorted(n.name for n in graph.nodes) == sorted(n.name for n in original)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(0, 10**6))
def test_a_sorted_graph_keeps_its_order_exactly(sizes, seed):
    graph = random_dag(sizes, seed)
    before = [n.name for n in graph.nodes]
    assert [n.name for n in toposort(graph).nodes] == before


def test_a_cycle_is_named():
    a, b = gs.Variable("a", np.float32, [1]), gs.Variable("b", np.float32, [1])
    graph = gs.Graph(nodes=[gs.Node("Relu", name="p", inputs=[b], outputs=[a]),
                            gs.Node("Relu", name="q", inputs=[a], outputs=[b])], outputs=[b])
    with pytest.raises(ValueError, match="cycle"):
        toposort(graph)
