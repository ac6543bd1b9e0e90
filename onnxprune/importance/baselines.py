"""Reference rankings that SLP is compared against: smallest L1 norm of a block's branch weights
(the magnitude criterion of filter-pruning work, applied to whole blocks), and random order."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.graph.analysis import ResidualBlock
from onnxprune.graph.normalize import to_graph


def l1_norms(model: onnx.ModelProto, blocks: list[ResidualBlock]) -> dict[str, float]:
    """Sum of |w| over the floating-point weights read by each block's branch (BN folded)."""
    graph = to_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    norms = {}
    for block in blocks:
        seen, total = set(), 0.0
        for name in block.branch_nodes:
            for t in nodes[name].inputs:
                values = getattr(t, "values", None)
                if values is not None and t.name not in seen and np.issubdtype(np.asarray(values).dtype, np.floating):
                    seen.add(t.name)
                    total += float(np.abs(np.asarray(values, np.float64)).sum())
        norms[block.join] = total
    return norms


def random_order(blocks: list[ResidualBlock], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [blocks[i].join for i in rng.permutation(len(blocks))]
