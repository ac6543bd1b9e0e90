"""Training-free repair of a pruned model: at every cut (repair.cuts) an affine map fitted by ridge least
squares (repair.fit) from the pruned model's tensor there to the original's, folded into a neighbouring
linear op or inserted (repair.place). docs/algorithms.md section 8; the idea is
ReplaceMe's (Shopkhoev et al., NeurIPS 2025) and, for CNNs, a closed-form PRACTISE adaptor (Wang et al.,
CVPR 2023).

Sequential fitting (the default) fits the cuts in graph order, each on the activations of the model with
the earlier maps in place, so a map also corrects what the maps before it left. Independent fitting
fits every map in one pass on the original's activations (x and y both from the original), as if the
tensors reaching each cut were exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.data.sources import Dataset
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.options import RepairOptions
from onnxprune.repair.cuts import Cut, cuts_of_blocks, find_cuts
from onnxprune.repair.fit import AffineMap, RidgeSums, channel_rows, solve
from onnxprune.repair.place import place_map
from onnxprune.runtime.capture import attention_mask_input, prefix_model
from onnxprune.runtime.session import create_session

log = logging.getLogger("onnxprune")


@dataclass
class RepairResult:
    model: onnx.ModelProto
    record: dict  # what was fitted where, with each map's error before and after (see ``repair``)
    provider: str


def repair(pruned: onnx.ModelProto, original: onnx.ModelProto, data: Dataset, options: RepairOptions = RepairOptions(),
           provider: str = "auto", blocks: Collection[str] | None = None) -> RepairResult:
    """``pruned`` with a fitted map at every cut, or with ``blocks`` (joins of removed blocks: a plan's
    ``repair_blocks``) only at the cuts of those blocks. The record lists, per map: the cut (source -> target), its
    channels, the rows fitted, the relative squared error at the cut before and after the fit, and where the
    map went; plus notes on differences that are not cuts, and the wall time."""
    start = time.perf_counter()
    current, original = infer_shapes(_copy(pruned)), reference_of(original)
    cuts, notes = find_cuts(current, original)
    cuts, left = planned_cuts(cuts, original, blocks)
    notes += [f"cut {c.source} -> {c.target} left without a map: the plan removes it without one" for c in left]
    notes += [f"cut {c.source} -> {c.target} skipped: only float32 tensors are repaired" for c in cuts
              if not _is_float32(current, c.source)]
    cuts = [c for c in cuts if _is_float32(current, c.source)]
    maps, used = [], "cpu"
    if options.sequential:
        for k, cut in enumerate(cuts):
            log.info("repair: fitting map %d of %d (%s -> %s)", k + 1, len(cuts), cut.source, cut.target)
            fitted, used = _fit(current, original, data, [cut], options, provider)
            current, how = place_map(infer_shapes(current), cut, fitted[0], options.fold)
            maps.append(_describe(cut, fitted[0], how))
    else:
        log.info("repair: fitting %d maps on the original's activations", len(cuts))
        known = {t for n in original.graph.node for t in n.output} | {i.name for i in original.graph.input}
        ours, theirs = [c for c in cuts if c.source in known], [c for c in cuts if c.source not in known]
        fitted, used = _fit(original, original, data, ours, options, provider) if ours else ([], "cpu")
        if theirs:  # a tensor the rewrite made (a merged conv's output): read from the pruned model
            fitted += _fit(current, original, data, theirs, options, provider)[0]
        for cut, affine in zip(ours + theirs, fitted):
            current, how = place_map(infer_shapes(current), cut, affine, options.fold)
            maps.append(_describe(cut, affine, how))
    _drop_unused_initializers(current)
    record = {"method": options.method, "sequential": options.sequential, "ridge": options.ridge,
              "samples": len(data), "maps": maps, "notes": notes, "seconds": time.perf_counter() - start,
              **({"blocks": list(blocks)} if blocks is not None else {})}
    return RepairResult(current, record, used)


def planned_cuts(cuts: list[Cut], reference: onnx.ModelProto,
                 blocks: Collection[str] | None) -> tuple[list[Cut], list[Cut]]:
    """(the cuts that get a map, the others): every cut when ``blocks`` is None, else those standing for one of
    the removed blocks ``blocks`` (repair.cuts.cuts_of_blocks on the analysis of ``reference``)."""
    if blocks is None:
        return cuts, []
    mapped = cuts_of_blocks(cuts, analyze_model(reference), blocks) if blocks else []
    return mapped, [c for c in cuts if c not in mapped]


def reference_of(original: onnx.ModelProto) -> onnx.ModelProto:
    """What a pruned model is compared with to find its cuts: the normalized original (BatchNorm folded, constants
    computed), where every rewrite starts, so the two differ only where something was removed; shapes inferred."""
    return infer_shapes(to_model(to_graph(original), original))


def with_placeholder_maps(pruned: onnx.ModelProto, reference: onnx.ModelProto, fold: bool = True,
                          blocks: Collection[str] | None = None) -> onnx.ModelProto:
    """``pruned`` with an identity map wherever ``repair`` would put a fitted one (with ``blocks``, only at the
    cuts of those removed blocks, as ``repair``): the same nodes, so the same latency, without fitting anything.
    A speed-up search that will be followed by repair times this form, so the maps' cost is paid inside the
    search (docs/algorithms.md section 8). ``reference``: ``reference_of(original)``, computed once for the
    whole search."""
    current = infer_shapes(_copy(pruned))
    cuts, _ = planned_cuts(find_cuts(current, reference)[0], reference, blocks)
    for cut in cuts:
        if not _is_float32(current, cut.source):
            continue
        d = _channels(current, cut.source, cut.axis)
        e = _channels(reference, cut.target, cut.axis)
        if d is None or e is None:
            continue
        identity = AffineMap(np.eye(d, e, dtype=np.float32), np.zeros(e, np.float32), 0, 0.0, 0.0)
        current, _ = place_map(infer_shapes(current), cut, identity, fold)
    return current


def _channels(model: onnx.ModelProto, tensor: str, axis: int) -> int | None:
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.name == tensor:
            dims = info.type.tensor_type.shape.dim
            return dims[axis].dim_value if axis < len(dims) and dims[axis].HasField("dim_value") else None
    return None


def _fit(source_model: onnx.ModelProto, original: onnx.ModelProto, data: Dataset, cuts: list[Cut],
         options: RepairOptions, provider: str) -> tuple[list[AffineMap], str]:
    """Maps for ``cuts``: x read from ``source_model``, y from ``original``, over one pass of ``data``."""
    sources, targets = list(dict.fromkeys(c.source for c in cuts)), list(dict.fromkeys(c.target for c in cuts))
    same = source_model is original
    wanted = list(dict.fromkeys(sources + targets)) if same else sources
    s_src = create_session(prefix_model(source_model, wanted), provider)
    s_orig = s_src if same else create_session(prefix_model(original, targets), provider)
    mask = attention_mask_input(original)
    mask = mask if mask in data.inputs else None
    sums: list[RidgeSums | None] = [None] * len(cuts)
    for batch in progress.batches(data, options.batch, f"repair: fitting {len(cuts)} map(s)"):
        keep = None if mask is None else batch.feeds[mask][:batch.count] != 0
        xs = dict(zip(wanted, s_src.run(batch.feeds, wanted)))
        ys = xs if same else dict(zip(targets, s_orig.run(batch.feeds, targets)))
        for i, cut in enumerate(cuts):
            x = _rows(xs[cut.source][:batch.count], cut.axis, keep)
            y = _rows(ys[cut.target][:batch.count], cut.axis, keep)
            if sums[i] is None:
                sums[i] = RidgeSums(x.shape[1], y.shape[1])
            sums[i].add(x, y)
    return [solve(s, options.ridge) for s in sums], s_src.provider


def _rows(tensor: np.ndarray, axis: int, keep: np.ndarray | None) -> np.ndarray:
    """Rows of channels; for a token sequence (batch, tokens, hidden) of a model with an attention mask, only
    the tokens the mask keeps (padding is not fitted: the model ignores it)."""
    if keep is not None and tensor.ndim == 3 and axis == 2 and tensor.shape[:2] == keep.shape:
        return tensor[keep]
    return channel_rows(tensor, axis)


def _describe(cut: Cut, fitted: AffineMap, how: str) -> dict:
    return {"source": cut.source, "target": cut.target, "channels": [int(fitted.weight.shape[0]),
                                                                     int(fitted.weight.shape[1])],
            "rows": fitted.rows, "error_before": fitted.error_before, "error_after": fitted.error_after,
            "placed": how}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _is_float32(model: onnx.ModelProto, tensor: str) -> bool:
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.name == tensor:
            return info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    return False


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    read = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in read]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
