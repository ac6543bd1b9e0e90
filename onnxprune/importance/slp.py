"""SLP: similarity-guided layer pruning (Pons et al., "Effective Layer Pruning Through Similarity
Metric Perspective", arXiv 2405.17081; docs/algorithms.md section 2).

A removable residual block's score is 1 - CKA(features of the original network, features with the
block removed), label-free, at the classifier's input. The lowest score is the least important
block. Scoring runs the original network once per batch, capturing each candidate block's input,
and then only the part of the network after each candidate (a suffix model) on that input.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import ResidualBlock, Structure, analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.options import ScoringOptions, TargetOptions
from onnxprune.plan import Plan, apply_plan, apply_prepared, fingerprint, prepare
from onnxprune.runtime.capture import suffix_model, with_outputs
from onnxprune.runtime.compare import Copy, cka_with_original, share_weights

log = logging.getLogger(__name__)


@dataclass
class BlockScore:
    join: str
    score: float
    macs: int
    params: int


@dataclass
class ScoreRun:
    scores: list[BlockScore]
    provider: str
    seconds: float
    samples: int


def stage_of(block: ResidualBlock) -> tuple:
    """Blocks whose output has the same channels and spatial size form a stage."""
    return tuple(block.output_shape[1:]) if block.output_shape else (block.index,)


def removal_candidates(structure: Structure, min_blocks_per_stage: int = 1) -> list[ResidualBlock]:
    """Removable blocks whose stage keeps at least ``min_blocks_per_stage`` blocks without them."""
    counts = Counter(stage_of(b) for b in structure.residual_blocks)
    return [b for b in structure.residual_blocks if b.removable and counts[stage_of(b)] > min_blocks_per_stage]


def score_blocks(model: onnx.ModelProto, data: Dataset, blocks: list[ResidualBlock], feature: str,
                 provider: str = "auto", batch: int = 64, suffix_only: bool = True,
                 unbiased: bool = False, memory_budget: int | None = None) -> ScoreRun:
    """SLP scores of ``blocks`` on ``data`` (the same samples for the original and every candidate);
    ``memory_budget``: bytes scoring may hold (runtime.compare; None: the default)."""
    start = time.perf_counter()
    if suffix_only:  # the network after each block, fed with the block's input as its output
        copies = []
        for b in blocks:
            suffix, side = suffix_model(model, b.output, [feature])
            copies.append(share_weights(Copy(suffix, {b.output: b.input, **{t: t for t in side}}, feature, feature),
                                        model))
    else:
        prepared = prepare(model)
        copies = [share_weights(Copy(with_outputs(apply_prepared(prepared, Plan(remove_blocks=[b.join]))[0], [feature]),
                                     {name: name for name in data.inputs}, feature, feature), model) for b in blocks]
    similarity, provider_used = cka_with_original(model, copies, data, provider, batch, unbiased, memory_budget)
    scores = [BlockScore(b.join, float(1.0 - value), b.macs, b.params) for b, value in zip(blocks, similarity)]
    return ScoreRun(scores, provider_used, time.perf_counter() - start, len(data))


@dataclass
class SLPResult:
    model: onnx.ModelProto
    plan: Plan
    history: list[dict] = field(default_factory=list)
    provider: str = "cpu"
    target_met: bool = True
    message: str = ""


def prune_slp(model: onnx.ModelProto, data: Dataset, feature: str, target: TargetOptions,
              scoring: ScoringOptions = ScoringOptions(), batch: int = 64,
              until: Callable[[onnx.ModelProto], bool] | None = None) -> SLPResult:
    """Remove the lowest-scoring block, re-score on the pruned network, repeat until ``target.remove_blocks``
    blocks are gone, ``target.macs_reduction`` of the MACs, or ``until(pruned model)`` holds (a measured
    speed-up, say); every stage keeps ``target.min_blocks`` blocks, and ``target.one_shot`` ranks once and removes
    in that order. Scored with ``scoring.provider`` within ``scoring.memory_budget``, ``batch`` samples a run."""
    remove_blocks, macs_reduction, one_shot = target.remove_blocks, target.macs_reduction, target.one_shot
    if sum(x is not None for x in (remove_blocks, macs_reduction, until)) != 1:
        raise OnnxPruneError("give exactly one stop criterion: --remove-blocks N, --macs-reduction F or --speedup X")
    if macs_reduction is not None and not 0 < macs_reduction < 1:
        raise OnnxPruneError(f"--macs-reduction is a fraction between 0 and 1, not {macs_reduction}")
    original_macs = analyze_model(model).macs
    current, removed, history, provider_used = model, [], [], scoring.provider
    ranking: list[BlockScore] | None = None
    first_scores: list[dict] = []  # the first round's score of every candidate (what a report draws)

    def done() -> bool:
        if remove_blocks is not None:
            return len(removed) >= remove_blocks
        if until is not None:
            return bool(removed) and until(current)
        return 1 - analyze_model(current).macs / original_macs >= macs_reduction

    met = False
    while True:
        if done():  # evaluated once per step: with a measured criterion, what stops the loop is what is reported
            met = True
            break
        structure = analyze_model(current)
        candidates = removal_candidates(structure, target.min_blocks)
        if not candidates:
            break
        if ranking is None or not one_shot:
            run = score_blocks(current, data, candidates, feature, scoring.provider, batch,
                               memory_budget=scoring.memory_budget)
            provider_used = run.provider
            ranking = sorted(run.scores, key=lambda s: s.score)
            first_scores = first_scores or [{"join": s.join, "score": s.score} for s in run.scores]
            log.info(f"slp: scored {len(candidates)} blocks on {run.samples} samples in {run.seconds:.1f} s ({run.provider})")
        allowed = {b.join for b in candidates}
        choice = next((s for s in ranking if s.join in allowed and s.join not in removed), None)
        if choice is None:
            break
        removed.append(choice.join)
        current = infer_shapes(apply_plan(current, Plan(remove_blocks=[choice.join]))[0])
        macs = analyze_model(current).macs
        history.append({"removed": choice.join, "score": choice.score, "macs": macs,
                        "macs_reduction": 1 - macs / original_macs})
        log.info(f"slp: removed {choice.join} (score {choice.score:.5f}); MACs -{100 * (1 - macs / original_macs):.1f}%")
    plan = Plan(remove_blocks=removed, fingerprint=fingerprint(model), method="slp-one-shot" if one_shot else "slp",
                predicted={"macs_before": original_macs, "macs_after": analyze_model(current).macs,
                           "history": history, "scores": first_scores})
    message = "" if met else (f"stopped after {len(removed)} blocks: no removable block is left whose stage keeps "
                              f"{target.min_blocks} block(s)")
    return SLPResult(current, plan, history, provider_used, met, message)


def take_in_order(order: list[str], structure: Structure, count: int, min_blocks_per_stage: int = 1) -> list[str]:
    """The first ``count`` blocks of ``order`` that can go while every stage keeps its minimum."""
    blocks = {b.join: b for b in structure.residual_blocks}
    left = Counter(stage_of(b) for b in structure.residual_blocks)
    taken = []
    for join in order:
        stage = stage_of(blocks[join])
        if len(taken) < count and blocks[join].removable and left[stage] > min_blocks_per_stage:
            taken.append(join)
            left[stage] -= 1
    return taken
