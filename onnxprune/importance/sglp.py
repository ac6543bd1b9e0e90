"""SGLP: similarity-guided layer partition pruning (Li et al., "SGLP: A Similarity Guided Fast Layer Partition
Pruning for Compressing Large Deep Models", arXiv 2410.14720; docs/algorithms.md section 3).

1. The CKA matrix of the stem's and every residual block's output on calibration data (similarity.matrix).
2. Fisher's optimal segmentation of that layer sequence into K contiguous segments, each layer described by its row
   of the matrix (planning.segments); K given, or the elbow of the loss curve.
3. GradNorm of every block (train.gradnorm; needs torch): the gradient norm of the cross-entropy with respect to the
   block's weights, labels or the model's own argmax as targets.
4. Removing N blocks: each segment's share of N is proportional to its number of removable blocks (largest
   remainder, ``allocate``), capped so that every segment keeps at least one block; inside a segment the removable
   blocks with the lowest GradNorm go. Everything is computed once, on the original model (one shot).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.data.sources import Dataset
from onnxprune.errors import MissingDependency, OnnxPruneError
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.planning.segments import Segmentation, choose
from onnxprune.plan import Plan, apply_plan, fingerprint
from onnxprune.similarity.matrix import LayerMatrix, layer_cka

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SGLPScores:
    """What SGLP computes on the original model, once."""

    matrix: LayerMatrix
    segmentation: Segmentation
    curve: tuple[float, ...]  # P(k, L) for k = 1..len(curve)
    chosen_by: str  # "given" or "elbow"
    grad_norm: dict[str, float]  # join -> GradNorm, every block with weights in its branch
    grad_labels: str  # "labels" or "pseudo-labels"
    grad_samples: int
    removable: tuple[str, ...]  # joins of the removable blocks, in graph order
    seconds: dict[str, float]

    def segment_blocks(self) -> list[list[str]]:
        """The joins of every block (removable or not) in each segment, in graph order."""
        return [[j for j in self.matrix.blocks[s:e] if j is not None] for s, e in self.segmentation.bounds]

    def capacities(self) -> tuple[list[int], list[int]]:
        """(removable blocks, blocks that may go) per segment: a segment keeps at least one of its blocks, so one
        made of removable blocks alone may lose all but one (a segment with the stem alone has none)."""
        removable = set(self.removable)
        counts, caps = [], []
        for blocks in self.segment_blocks():
            r = sum(j in removable for j in blocks)
            counts.append(r)
            caps.append(r - 1 if r and r == len(blocks) else r)
        return counts, caps


def allocate(weights: list[int], caps: list[int], total: int) -> list[int]:
    """``total`` split over segments in proportion to ``weights`` by the largest-remainder method, no segment above
    its cap: a segment whose share exceeds its cap gets its cap, and the rest is split again over the others. Ties
    of remainders go to the earlier segment. Gives out min(total, sum of caps)."""
    counts = [0] * len(weights)
    active = [i for i, (w, c) in enumerate(zip(weights, caps)) if w > 0 and c > 0]
    left = min(total, sum(caps[i] for i in active))
    while left > 0 and active:
        weight = sum(weights[i] for i in active)
        quotas = {i: left * weights[i] / weight for i in active}
        share = {i: math.floor(quotas[i]) for i in active}
        for i in sorted(active, key=lambda i: (-(quotas[i] - share[i]), i))[:left - sum(share.values())]:
            share[i] += 1
        over = [i for i in active if share[i] > caps[i]]
        if not over:
            for i in active:
                counts[i] = share[i]
            break
        for i in over:
            counts[i] = caps[i]
            left -= caps[i]
        active = [i for i in active if i not in over]
    return counts


def removal(scores: SGLPScores, count: int, per_segment: list[int] | None = None) -> tuple[list[str], list[int]]:
    """(joins to remove in graph order, how many from each segment): ``count`` blocks allocated over the segments
    (``allocate``), or ``per_segment`` counts as given; the lowest GradNorm first inside each segment."""
    weights, caps = scores.capacities()
    if per_segment is not None:
        if len(per_segment) != len(caps):
            raise OnnxPruneError(f"{len(per_segment)} counts given for {len(caps)} segments")
        for k, (n, cap) in enumerate(zip(per_segment, caps)):
            if not 0 <= n <= cap:
                raise OnnxPruneError(f"segment {k} may lose 0..{cap} blocks (it keeps at least one), not {n}")
        quotas = list(per_segment)
    else:
        quotas = allocate(weights, caps, count)
    removable = set(scores.removable)
    chosen = []
    for blocks, quota in zip(scores.segment_blocks(), quotas):
        candidates = sorted((j for j in blocks if j in removable), key=lambda j: (scores.grad_norm.get(j, 0.0),
                                                                                   blocks.index(j)))
        chosen += candidates[:quota]
    order = {j: i for i, j in enumerate(scores.matrix.blocks)}
    return sorted(chosen, key=order.__getitem__), quotas


def score_sglp(model: onnx.ModelProto, data: Dataset, segments: int | None = None, provider: str = "auto",
               batch: int = 64, use_labels: bool = True) -> SGLPScores:
    """The CKA matrix, the segmentation (``segments`` K, or the elbow) and every block's GradNorm on ``data``."""
    try:
        from onnxprune.train.gradnorm import grad_norms
    except ImportError as exc:
        raise MissingDependency(f"SGLP's GradNorm needs torch: pip install 'onnxprune[torch]' ({exc})") from None
    structure = analyze_model(model)
    removable = tuple(b.join for b in structure.residual_blocks if b.removable)
    if not removable:
        raise OnnxPruneError("SGLP has nothing to remove: the model has no removable residual block")
    seconds = {}
    clock = time.perf_counter()
    matrix = layer_cka(model, structure, data, provider, batch)
    seconds["cka"] = time.perf_counter() - clock
    layers = len(matrix.layers)
    if segments is not None and not 1 <= segments <= layers:
        raise OnnxPruneError(f"--segments must lie in 1..{layers} (the stem and {layers - 1} blocks), not {segments}")
    clock = time.perf_counter()
    segmentation, curve = choose(matrix.cka, segments)
    seconds["segmentation"] = time.perf_counter() - clock
    log.info(f"sglp: CKA matrix of {layers} layers on {matrix.samples} samples in {seconds['cka']:.1f} s; "
             f"{len(segmentation.bounds)} segments ({'given' if segments else 'elbow'}) starting at layers "
             f"{list(segmentation.starts)}")
    clock = time.perf_counter()
    # BN folded, so a block's weights are its convs'; the joins keep their names.
    normal = to_model(to_graph(model), model)
    blocks = [b for b in analyze_model(normal).residual_blocks]
    run = grad_norms(normal, blocks, data, batch, use_labels)
    seconds["grad_norm"] = time.perf_counter() - clock
    log.info(f"sglp: GradNorm of {len(blocks)} blocks on {run.samples} samples ({run.labels}) in "
             f"{seconds['grad_norm']:.1f} s")
    return SGLPScores(matrix, segmentation, tuple(curve), "given" if segments else "elbow", dict(run.norms),
                      run.labels, run.samples, removable, seconds)


def predicted(scores: SGLPScores, quotas: list[int]) -> dict:
    """What a plan records of SGLP's reasoning: the matrix, the segments, the GradNorms, the allocation."""
    weights, caps = scores.capacities()
    return {
        "layers": list(scores.matrix.layers),
        "layer_blocks": list(scores.matrix.blocks),
        "cka": np.round(scores.matrix.cka, 6).tolist(),
        "cka_samples": scores.matrix.samples,
        "cka_estimator": "unbiased minibatch linear CKA, flattened outputs",
        "segments": [{"layers": [s, e], "blocks": blocks, "removable": r, "may_remove": c, "removed": q}
                     for (s, e), blocks, r, c, q in zip(scores.segmentation.bounds, scores.segment_blocks(), weights,
                                                        caps, quotas)],
        "segments_chosen_by": scores.chosen_by,
        "segment_losses": list(scores.curve),
        "grad_norm": scores.grad_norm,
        "grad_norm_targets": scores.grad_labels,
        "grad_norm_samples": scores.grad_samples,
        "seconds": scores.seconds,
    }


@dataclass
class SGLPResult:
    model: onnx.ModelProto
    plan: Plan
    history: list[dict] = field(default_factory=list)
    provider: str = "cpu"
    target_met: bool = True
    message: str = ""
    scores: SGLPScores | None = None


def prune_sglp(model: onnx.ModelProto, data: Dataset, remove_blocks: int | None = None,
               until: Callable[[onnx.ModelProto], bool] | None = None, segments: int | None = None,
               per_segment: list[int] | None = None, provider: str = "auto", batch: int = 64,
               use_labels: bool = True) -> SGLPResult:
    """Remove ``remove_blocks`` blocks (or ``per_segment`` counts) by SGLP; or, with ``until``, the SGLP plans for 1, 2,
    ... blocks in turn until ``until(pruned model)`` holds (a measured speed-up, say)."""
    if sum(x is not None for x in (remove_blocks, until, per_segment)) != 1:
        raise OnnxPruneError("give exactly one stop criterion: --remove-blocks N or --speedup X")
    if remove_blocks is not None and remove_blocks < 1:
        raise OnnxPruneError(f"--remove-blocks needs at least 1, not {remove_blocks}")
    scores = score_sglp(model, data, segments, provider, batch, use_labels)
    original_macs = analyze_model(model).macs
    _, caps = scores.capacities()
    capacity = sum(caps)
    history: list[dict] = []

    def pruned(joins: list[str]) -> onnx.ModelProto:
        return apply_plan(model, Plan(remove_blocks=joins))[0]

    met, message = True, ""
    if until is None:
        joins, quotas = removal(scores, remove_blocks or 0, per_segment)
        current = pruned(joins)
        if remove_blocks is not None and len(joins) < remove_blocks:
            met = False
            message = (f"removed {len(joins)} blocks, not {remove_blocks}: each of the {len(caps)} segments keeps at "
                       f"least one block (fewer --segments allow more)")
    else:
        joins, quotas, current, met = [], [0] * len(caps), model, False
        for count in range(1, capacity + 1):
            joins, quotas = removal(scores, count)
            current = pruned(joins)
            history.append({"blocks": count, "removed": joins, "macs": analyze_model(current).macs})
            if until(current):
                met = True
                break
        if not met:
            message = (f"stopped after {len(joins)} blocks: each of the {len(caps)} segments keeps at least one block "
                       "(fewer --segments allow more)")
    if until is None:
        history = [{"removed": j, "segment": scores.segmentation.segment_of(scores.matrix.blocks.index(j)),
                    "grad_norm": scores.grad_norm.get(j)} for j in joins]
    macs = analyze_model(current).macs
    log.info(f"sglp: removed {len(joins)} blocks {quotas} per segment; MACs -{100 * (1 - macs / original_macs):.1f}%")
    plan = Plan(remove_blocks=joins, fingerprint=fingerprint(model), method="sglp",
                predicted={"macs_before": original_macs, "macs_after": macs, **predicted(scores, quotas),
                           "history": history})
    return SGLPResult(current, plan, history, scores.matrix.provider, met, message, scores)
