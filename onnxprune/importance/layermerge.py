"""Importance of LayerMerge rows by CKA instead of fine-tuning (docs/algorithms.md section 4).

The public LayerMerge code fine-tunes the whole network for an epoch per row and uses
exp(delta accuracy / 100). Here a row's importance is h = log CKA(original representation,
representation with only that row's change applied), on the calibration data: 0 for an unchanged
conv, below 0 for every change. Scopes:

- ``global`` (default): at the feature tensor (the classifier's input), as SLP;
- ``local``: at the output of the first chain conv after the segment (the whole feature tensor
  when the segment ends the chain): cheaper, it runs only the changed region and one conv.

Each row runs only the part of the modified network after the segment's input, fed with that
input as captured from the original network (as SLP's suffix scoring). A row that replaces a block
by a fitted map (repair on) is scored with the block removed and its map inserted at the cut.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from onnxprune.data.sources import Dataset
from onnxprune.graph.analysis import Structure
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.plan import Plan, PlanError, apply_prepared, prepare
from onnxprune.planning.candidates import Option, options_plan
from onnxprune.repair.cuts import Cut
from onnxprune.repair.fit import AffineMap
from onnxprune.repair.place import place_map
from onnxprune.runtime.capture import suffix_model
from onnxprune.runtime.compare import Copy, cka_with_original, share_weights

log = logging.getLogger(__name__)
FLOOR = math.log(1e-6)  # importance of a row whose representation no longer resembles the original


@dataclass
class RowImportance:
    option: Option
    cka: float
    importance: float


def importance_of(cka_value: float) -> float:
    return max(FLOOR, math.log(cka_value)) if cka_value > 0 else FLOOR


@dataclass
class RowCopies:
    """The modified networks that score the changed options, and the options the rewrite refused."""

    base: onnx.ModelProto  # the normalized original the copies are compared with
    options: list[Option]  # every option that can be applied (originals included)
    copies: list[Copy]  # one per changed option of ``options``, in order
    refused: list[tuple[Option, str]]  # options whose rewrite failed, with why


def row_copies(model: onnx.ModelProto, structure: Structure, options: list[Option], feature: str,
               scope: str = "global", maps: Mapping[str, tuple[Cut, AffineMap]] | None = None) -> RowCopies:
    """Apply every changed option alone and cut the result after the segment's input (its suffix). An
    option the rewrite refuses is set aside with the reason, so one bad option never stops a search. An option
    that replaces a block by a fitted map has the block removed and ``maps[join]`` (its cut, its map:
    repair.blocks) inserted at the cut, never folded, so that it lies in the suffix (a fold computes the same)."""
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be global or local, not {scope!r}")
    base = to_model(to_graph(model), model)  # normalized: tensor names as the analysis has them
    prepared = prepare(base)  # imported and analysed once, rewritten on a copy per option
    conv_io = {n.name: (n.input[0], n.output[0]) for n in base.graph.node if n.op_type == "Conv"}
    kept, copies, refused = [], [], []
    for option in options:
        if option.original:
            kept.append(option)
            continue
        if option.fitted_map is not None and option.remove_block not in (maps or {}):
            refused.append((option, f"no map was fitted for block {option.remove_block}"))
            continue
        try:
            modified, _ = apply_prepared(prepared, Plan(**options_plan([option])))
        except PlanError as exc:
            refused.append((option, str(exc)))
            continue
        if option.fitted_map is not None:
            cut, fitted = maps[option.remove_block]
            modified, _ = place_map(infer_shapes(modified), cut, fitted, fold=False)
        if option.remove_block is not None:  # cut at the block's input: the block may lie off the chain
            start = next(b.input for b in structure.residual_blocks if b.join == option.remove_block)
        else:
            start = conv_io[structure.convs[option.start].name][0]
        target = feature
        if scope == "local" and option.remove_block is None and option.end < len(structure.convs):
            target = conv_io[structure.convs[option.end].name][1]
        suffix, side = suffix_model(modified, start, [target])
        kept.append(option)
        copies.append(share_weights(Copy(suffix, {t: t for t in (start, *side)}, target, target), base))
    return RowCopies(base, kept, copies, refused)


def score_rows(rows: RowCopies, data: Dataset, provider: str = "auto", batch: int = 64,
               memory_budget: int | None = None) -> tuple[list[RowImportance], str]:
    """(h for every option of ``rows``, the onnxruntime provider used); originals get 0 without being run.
    ``memory_budget``: bytes scoring may hold (runtime.compare; None: the default)."""
    start_time = time.perf_counter()
    similarity, provider_used = cka_with_original(rows.base, rows.copies, data, provider, batch,
                                                  memory_budget=memory_budget)
    changed = iter(similarity)
    result = [RowImportance(o, 1.0, 0.0) if o.original else _row(o, next(changed)) for o in rows.options]
    log.info(f"layermerge: scored {len(rows.copies)} rows in {time.perf_counter() - start_time:.1f} s")
    return result, provider_used


def _row(option: Option, cka_value: float) -> RowImportance:
    return RowImportance(option, cka_value, min(importance_of(cka_value), -1e-9))


def row_importances(model: onnx.ModelProto, structure: Structure, options: list[Option], data: Dataset,
                    feature: str, scope: str = "global", provider: str = "auto",
                    batch: int = 64, memory_budget: int | None = None,
                    maps: Mapping[str, tuple[Cut, AffineMap]] | None = None) -> tuple[list[RowImportance], str]:
    """``row_copies`` then ``score_rows``: h for every option the rewrite accepts, and the provider used."""
    return score_rows(row_copies(model, structure, options, feature, scope, maps), data, provider, batch,
                      memory_budget)
