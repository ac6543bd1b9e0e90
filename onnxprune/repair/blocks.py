"""Maps for single removed blocks: LayerMerge's third option, "replace the block by a fitted map"
(docs/algorithms.md sections 4.1 and 8).

For each removable block, the block is removed alone from the normalized original and the one cut this
leaves is found (repair.cuts). What the DP needs of its map is known from the graph alone: the shape of the
tensor at the cut, its channel axis, and whether repair would fold the map exactly into the op producing
that tensor (repair.place, tried with an identity map). The maps themselves are fitted independently, in
one pass of the original over the calibration data: with a single block removed, the tensor reaching the
cut is exactly the original's, so the original's activations give both sides of the fit.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.data.sources import Dataset
from onnxprune.graph.io import infer_shapes
from onnxprune.options import RepairOptions
from onnxprune.plan import Plan, PlanError, apply_prepared, prepare
from onnxprune.planning.candidates import FittedMap
from onnxprune.repair.cuts import Cut, find_cuts
from onnxprune.repair.fit import AffineMap
from onnxprune.repair.linear import _fit, _is_float32
from onnxprune.repair.place import place_map


@dataclass(frozen=True)
class BlockCut:
    """The cut that removing block ``join`` alone leaves, and what planning needs of its map."""

    join: str
    cut: Cut
    fitted_map: FittedMap


def block_cuts(base: onnx.ModelProto, joins: Collection[str], fold: bool = True) -> tuple[dict[str, BlockCut],
                                                                                          list[str]]:
    """join -> its BlockCut for every block of ``joins`` that can be replaced by a map, and notes on those that
    cannot (why). ``base``: the normalized original (``speedup.normalized``); ``fold``: RepairOptions.fold."""
    reference = infer_shapes(_copy(base))
    prepared = prepare(base)
    found, notes = {}, []
    for join in dict.fromkeys(joins):
        try:
            removed, _ = apply_prepared(prepared, Plan(remove_blocks=[join]))
        except PlanError as exc:
            notes.append(f"block {join}: no map option: {exc}")
            continue
        removed = infer_shapes(removed)
        cuts, _ = find_cuts(removed, reference)
        if len(cuts) != 1:
            notes.append(f"block {join}: no map option: its removal leaves {len(cuts)} cuts, not one")
            continue
        cut = cuts[0]
        dims = _dims(removed, cut.source)
        if not _is_float32(removed, cut.source) or dims is None or not all(isinstance(d, int) and d > 0
                                                                           for d in dims[1:]):
            notes.append(f"block {join}: no map option: the tensor at its cut is not float32 of static size")
            continue
        channels = dims[cut.axis]
        identity = AffineMap(np.eye(channels, dtype=np.float32), np.zeros(channels, np.float32), 0, 0.0, 0.0)
        folds = fold and place_map(removed, cut, identity, True)[1].startswith("folded")
        found[join] = BlockCut(join, cut, FittedMap(tuple(dims[1:]), cut.axis - 1, folds))
    return found, notes


def fit_block_maps(base: onnx.ModelProto, cuts: dict[str, BlockCut], data: Dataset,
                   options: RepairOptions = RepairOptions(),
                   provider: str = "auto") -> tuple[dict[str, AffineMap], str]:
    """(join -> the map fitted for its cut, the onnxruntime provider used): every block's map fitted
    independently by ridge least squares (repair.fit), both sides read from one pass of ``base`` over ``data``."""
    if not cuts:
        return {}, "cpu"
    reference = infer_shapes(_copy(base))
    fitted, used = _fit(reference, reference, data, [c.cut for c in cuts.values()], options, provider)
    return dict(zip(cuts, fitted)), used


def _dims(model: onnx.ModelProto, tensor: str) -> list | None:
    """The dims of ``tensor`` (an int, or the symbol's name), or None when its shape is unknown."""
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.name == tensor and info.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim]
    return None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
