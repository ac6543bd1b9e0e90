"""Immediate dominators of a DAG (Cooper, Harvey & Kennedy, "A Simple, Fast Dominance Algorithm", 2001).

Nodes are the integers 0..n-1 in topological order; node 0 is the root (a virtual source that
feeds every graph input). On a DAG visited in topological order one pass is exact.
"""

from __future__ import annotations

from collections.abc import Sequence


def immediate_dominators(preds: Sequence[Sequence[int]]) -> list[int]:
    """``idom[v]`` for every node; ``idom[0] == 0``. Every node but 0 needs a predecessor < itself."""
    idom = [-1] * len(preds)
    if not preds:
        return idom
    idom[0] = 0
    for v in range(1, len(preds)):
        if not preds[v]:
            raise ValueError(f"node {v} has no predecessor: not reachable from the root")
        dom = -1
        for p in preds[v]:
            if p >= v:
                raise ValueError(f"edge {p} -> {v} is not in topological order")
            dom = p if dom < 0 else common_dominator(idom, dom, p)
        idom[v] = dom
    return idom


def common_dominator(idom: Sequence[int], a: int, b: int) -> int:
    """The nearest node that dominates both ``a`` and ``b`` (each node dominates itself)."""
    while a != b:
        while a > b:
            a = idom[a]
        while b > a:
            b = idom[b]
    return a


def dominates(idom: Sequence[int], a: int, b: int) -> bool:
    while b > a:
        b = idom[b]
    return a == b
