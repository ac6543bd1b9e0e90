"""Residual blocks off the conv chain as LayerMerge options (docs/algorithms.md section 4).

LayerMerge's DP tiles the chain's positions 0..D. A removable block whose branch holds no chain conv (a
ViT's attention and MLP blocks, a block of Gemm/MatMul layers) has no place there. Each such block gets a
position of its own after the chain: position D + k - 1 -> D + k has two options, keep the block (its
branch's latency, importance 0, an original row) or remove it (no latency, its CKA importance). The DP then
weighs them as it weighs chain rows, so SLP's move is in the search space for every removable block.

Blocks that nest inside one another are left out when both are off the chain: removing the outer one would
also remove the inner one, which two independent positions cannot express.

With repair on, every "remove the block" option, on the chain or off it, gets a twin "replace the block by a
fitted map" over the same positions (``replace_options``): keep / remove / replace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from onnxprune.graph.analysis import ResidualBlock, Structure
from onnxprune.graph.rules import remove_refusal
from onnxprune.planning.candidates import FittedMap, Option, enumerate_options


def off_chain_blocks(structure: Structure) -> list[ResidualBlock]:
    """Removable blocks with no chain conv in their branch, none inside another of them, in graph order."""
    chain = {c.name for c in structure.convs}
    candidates = {b.index: b for b in structure.residual_blocks
                  if remove_refusal(b) is None and not chain.intersection(b.branch_nodes)}
    nested = set()
    for b in candidates.values():
        parent = b.parent
        while parent is not None:
            if parent in candidates:
                nested.update((b.index, parent))
            parent = structure.residual_blocks[parent].parent
    return [b for index, b in candidates.items() if index not in nested]


def block_options(structure: Structure) -> list[Option]:
    """Keep and remove options of every off-chain block, at positions after the chain's."""
    options = []
    for k, block in enumerate(off_chain_blocks(structure)):
        start = len(structure.convs) + k
        common = {"start": start, "end": start + 1, "keep": (), "drop": (), "kernel": (), "stride": (),
                  "depthwise": False}
        options.append(Option(**common, keep_block=block.join))
        options.append(Option(**common, remove_block=block.join))
    return options


def positions(structure: Structure, options: list[Option]) -> int:
    """The last DP position: the chain's convs, then one per off-chain block."""
    return max([len(structure.convs)] + [o.end for o in options])


def search_space(structure: Structure, l1: dict[str, float]) -> list[Option]:
    """Every LayerMerge option: the chain's segments (planning/candidates.py), then the off-chain blocks."""
    return enumerate_options(structure, l1) + block_options(structure)


def replace_options(options: list[Option], maps: Mapping[str, FittedMap]) -> list[Option]:
    """For every option that removes a block with an entry in ``maps`` (join -> its map), the option that removes
    it and puts the fitted map in its place: same positions, the map's own latency row, its own importance."""
    return [dataclasses.replace(o, fitted_map=maps[o.remove_block]) for o in options
            if o.remove_block is not None and o.fitted_map is None and o.remove_block in maps]
