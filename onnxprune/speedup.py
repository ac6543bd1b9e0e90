"""Pruning to a measured speed-up target ("make this model 1.5x faster on my target").

LayerMerge (Kim et al., ICML 2024): enumerate options, time their rows on the backend (or reuse a
table), score them by CKA, solve the DP for the latency budget, apply, verify, and measure the
original and the pruned model side by side. When the measured speed-up misses the target, the
budget is tightened by what the rows' predicted saving turned out to be worth (``tightened_budget``)
and the DP solved again, a bounded number of times; when it overshoots the target by more than
``OVERSHOOT``, the budget is loosened the same way (``loosened_budget``), since speed beyond the target
costs accuracy the user did not agree to give. The met plan closest to the target is returned.
SLP: remove blocks by SLP until the measured speed-up meets the target.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError, VerificationFailed
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.importance.layermerge import row_copies, score_rows
from onnxprune.importance.sglp import prune_sglp
from onnxprune.importance.slp import prune_slp
from onnxprune.latency.backends import Backend
from onnxprune.latency.measure import compare
from onnxprune.latency.table import LatencyTable, build_table, row_signature
from onnxprune.plan import Plan, apply_plan, fingerprint
from onnxprune.planning import dp
from onnxprune.planning import blocks
from onnxprune.planning.blocks import search_space
from onnxprune.planning.candidates import Option, conv_l1_norms, options_plan
from onnxprune.options import RepairOptions, ScoringOptions, TargetOptions
from onnxprune.progress import progress
from onnxprune.repair.blocks import block_cuts, fit_block_maps
from onnxprune.repair.linear import reference_of, with_placeholder_maps
from onnxprune.verify import Verification, verify

log = logging.getLogger(__name__)
UNITS = 2000  # latency units in the budget: fine enough, and one solve stays well under a second
TABLE_ROUNDS, MEASURE_ROUNDS = 20, 25  # defaults of `latency --rounds` and `bench --rounds`
OVERSHOOT = 0.05  # a plan measured more than this much above the target gives away accuracy: solved again, looser
# The original measured this much slower or faster than before in the same search: the machine changed speed
# (docs/algorithms.md, section 4.6), and the measurement is taken again.
SPEED_CHANGE = 1.25


@dataclass
class SpeedupResult:
    model: onnx.ModelProto
    plan: Plan
    target: float
    speedup: float  # measured, original / pruned, side by side
    original_s: float
    pruned_s: float
    predicted_s: float | None
    met: bool
    attempts: list[dict] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    table: LatencyTable | None = None
    verification: Verification | None = None
    provider: str = "cpu"  # the onnxruntime provider that scored (really used, not asked for)
    pareto: list[dict] = field(default_factory=list)  # predicted trade-off curve, when asked for
    note: str = ""  # why the search stopped short of the target, when it did
    notes: list[str] = field(default_factory=list)  # options left out of the search, and why
    rounds_s: list[list[float]] = field(default_factory=list)  # the measurement's seconds per round: original, pruned


def normalized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The original as every rewrite starts from it (constants and BN folded: graph.normalize): the baseline of
    every speed-up, so that what normalizing alone gains (weights computed at run time by an old export) is
    never counted as pruning's."""
    return to_model(to_graph(model), model)


@dataclass(frozen=True)
class Measurement:
    """Where and how a speed-up search measures each candidate against the original: on ``backend`` at latency
    batch ``batch``, ``rounds`` side by side (None: each step's default), timing ``timed(pruned)`` (the model with
    placeholder repair maps, when repair follows; None: the pruned model itself)."""

    backend: Backend
    batch: int
    rounds: int | None = None
    timed: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None


def _measure(original: onnx.ModelProto, pruned: onnx.ModelProto, how: Measurement,
             expected_s: float | None = None) -> tuple[float, float, float, list[list[float]]]:
    """(original seconds, pruned seconds, speed-up, the seconds of each in every round): medians, the speed-up
    read within rounds.

    ``expected_s``: what the original took earlier in the search (the latency table's whole model, or the first
    measurement). An original SPEED_CHANGE times slower or faster than that means the machine changed speed while
    the models took turns, and a small model's speed-up can read far off then (benchmarks/RESULTS.md: one plan of
    MobileNetV2 read 1.33x in such spells and 0.94x outside them). The pair is measured once more, and the
    measurement whose original is closer to ``expected_s`` is kept."""
    timed = how.timed(pruned) if how.timed else pruned
    models = [original, timed]
    measured = compare(models, how.backend, how.batch, how.rounds or MEASURE_ROUNDS)
    if expected_s and not 1 / SPEED_CHANGE <= measured.medians[0] / expected_s <= SPEED_CHANGE:
        log.warning(f"the original measured {1e3 * measured.medians[0]:.3f} ms against {1e3 * expected_s:.3f} ms "
                    f"earlier: the machine changed speed; measuring again")
        again = compare(models, how.backend, how.batch, how.rounds or MEASURE_ROUNDS)
        measured = min(measured, again, key=lambda m: abs(m.medians[0] / expected_s - 1))
    return measured.medians[0], measured.medians[1], measured.speedups[1], measured.times


def tightened_budget(whole_s: float, predicted_s: float, measured_speedup: float, target: float,
                     max_step: float = 3.0) -> float:
    """The next whole-model budget, in table seconds, after a solve predicted ``predicted_s`` for a
    model whose original the table puts at ``whole_s`` and measured ``measured_speedup`` < ``target``.

    What rows mispredict is the saving, not the part of the network no row touches, so the miss is
    read in savings: of the predicted relative saving 1 - predicted/whole, 1 - 1/measured came true,
    and the next solve asks for the needed saving 1 - 1/target divided by that yield (at most
    ``max_step`` times the last prediction's saving). It is never looser than shrinking the last
    prediction by measured/target."""
    proportional = predicted_s * measured_speedup / target
    predicted_saving = 1 - predicted_s / whole_s
    measured_saving = 1 - 1 / measured_speedup
    if predicted_saving <= 0 or measured_saving <= 0:
        return proportional
    wanted = min((1 - 1 / target) * predicted_saving / measured_saving, max_step * predicted_saving)
    return min(proportional, whole_s * (1 - wanted))


def loosened_budget(whole_s: float, predicted_s: float, measured_speedup: float, target: float) -> float:
    """The next whole-model budget after a solve predicted ``predicted_s`` and measured ``measured_speedup``
    above ``target``: the savings read as in ``tightened_budget`` (1 - 1/measured of the predicted 1 -
    predicted/whole came true), so the next solve asks for the saving the target needs at that yield. Never
    looser than growing the last prediction by measured/target, never tighter than the last prediction."""
    proportional = predicted_s * measured_speedup / target
    predicted_saving = 1 - predicted_s / whole_s
    measured_saving = 1 - 1 / measured_speedup
    if predicted_saving <= 0 or measured_saving <= 0:
        return max(predicted_s, proportional)
    wanted = (1 - 1 / target) * predicted_saving / measured_saving
    return max(predicted_s, min(proportional, whole_s * (1 - wanted)))


def out_of_reach(target: float, backend: str, whole_s: float, fixed_s: float, fastest_s: float, attempt: int) -> str:
    """Why no plan reaches ``target``: the fastest plan the options allow, and the share of the latency that lies in
    what LayerMerge may not change (the table's fixed part: shortcut convs, concatenations, pooling, classifiers)."""
    best = whole_s / (fixed_s + fastest_s) if fixed_s + fastest_s > 0 else float("inf")
    return (f"no combination of merges and removals reaches {target}x on {backend} (attempt {attempt}): the fastest "
            f"plan its options allow is predicted at {best:.2f}x, and {100 * fixed_s / whole_s:.0f}% of the latency lies "
            "in what LayerMerge may not change (convs off the chain, concatenations, pooling, the classifier)")


def layermerge_to_speedup(model: onnx.ModelProto, data: Dataset, feature: str, target: float, how: Measurement,
                          scoring: ScoringOptions = ScoringOptions(), data_batch: int = 64,
                          table: LatencyTable | None = None, max_attempts: int = 4,
                          with_pareto: bool = False, repair: RepairOptions | None = None) -> SpeedupResult:
    """LayerMerge to a ``target`` speed-up measured as ``how`` says; rows are scored on ``data`` in runs of
    ``data_batch`` samples. With ``repair`` (repair to follow), every removable block also has the option "replace
    it by a fitted map" (``_map_options``), the plan records the blocks that get one (``Plan.repair_blocks``), and
    each candidate is timed with placeholder maps at exactly those blocks."""
    stages: dict[str, float] = {}
    clock = time.perf_counter()
    structure = analyze_model(model)
    baseline = normalized(model)
    options = search_space(structure, conv_l1_norms(to_graph(model)))
    last = blocks.positions(structure, options)
    stages["candidates"] = time.perf_counter() - clock
    maps, map_notes, reference = {}, [], reference_of(model) if repair is not None else None
    if repair is not None:
        clock = time.perf_counter()
        options, maps, map_notes = _map_options(baseline, options, data, repair, scoring.provider)
        stages["repair maps"] = time.perf_counter() - clock
    log.info(f"layermerge: {len(options)} options over {len(structure.convs)} chain convs and "
             f"{last - len(structure.convs)} blocks off the chain")
    clock = time.perf_counter()
    copies = row_copies(model, structure, options, feature, scoring.scope or "global", maps)
    notes = map_notes + [f"option {o.start}..{o.end} ({', '.join(o.keep or o.drop)}) left out: {why}"
                         for o, why in copies.refused]
    for note in notes:
        log.info(f"layermerge: {note}")
    stages["candidates"] += time.perf_counter() - clock
    if table is None:
        clock = time.perf_counter()
        table = build_table(baseline, structure, copies.options, how.backend, how.batch, fingerprint(model),
                            rounds=how.rounds or TABLE_ROUNDS)
        stages["latency table"] = time.perf_counter() - clock
    clock = time.perf_counter()
    rows, provider_used = score_rows(copies, data, scoring.provider, data_batch)
    stages["importance"] = time.perf_counter() - clock
    rows, untimed = _timed_map_rows(rows, table, structure)
    notes += untimed
    dp_rows = [dp.Row(r.option.start, r.option.end, table.option_latency(r.option, structure), r.importance, r.option)
               for r in rows]
    chain_budget = table.whole_s / target - table.fixed_s
    curve = _pareto(dp_rows, last, table) if with_pareto else []
    attempts: list[dict] = []
    results: list[SpeedupResult] = []
    stages["dp"] = stages["apply"] = stages["verify"] = stages["measure"] = 0.0
    tried: set[tuple] = set()
    for attempt in progress(range(1, max_attempts + 1), desc="layermerge: speed-up search"):
        if chain_budget <= 0:
            if results:
                log.info(f"layermerge: the tightened budget leaves nothing for the convs; stopping after {attempt - 1}")
                break
            raise OnnxPruneError(f"a {target}x speed-up is out of reach: the part of the network LayerMerge "
                                 "cannot change takes more than the whole budget")
        clock = time.perf_counter()
        try:
            solution = dp.solve(dp_rows, last, chain_budget, chain_budget / UNITS)
        except dp.Infeasible:
            if results:
                log.info(f"layermerge: no plan fits the tightened budget; stopping after {attempt - 1} attempts")
                break
            raise OnnxPruneError(out_of_reach(target, how.backend.name, table.whole_s, table.fixed_s,
                                              dp.fastest(dp_rows, last), attempt)) from None
        stages["dp"] += time.perf_counter() - clock
        chosen = [r.key for r in solution.rows]
        if tuple(chosen) in tried:
            log.info(f"layermerge: the new budget gives a plan already measured; stopping after {attempt - 1} attempts")
            break
        tried.add(tuple(chosen))
        plan = Plan(**options_plan([o for o in chosen if not o.original]), fingerprint=fingerprint(model),
                    method="layermerge")
        if repair is not None:  # the removed blocks that get a map; the others are removed without one
            plan.repair_blocks = plan.repair_blocks or []
        clock = time.perf_counter()
        pruned, _ = apply_plan(model, plan)
        stages["apply"] += time.perf_counter() - clock
        clock = time.perf_counter()
        verification = verify(model, pruned, feeds=next(data.batches(16)).feeds)
        stages["verify"] += time.perf_counter() - clock
        if not verification.passed:
            raise VerificationFailed(f"the pruned model failed verification: {verification.summary()}")
        clock = time.perf_counter()
        t_original, t_pruned, speedup, rounds_s = _measure(baseline, pruned, _with_maps(how, reference, repair, plan),
                                                           table.whole_s)
        stages["measure"] += time.perf_counter() - clock
        predicted = table.fixed_s + solution.latency
        attempts.append({"attempt": attempt, "budget_s": chain_budget + table.fixed_s, "predicted_s": predicted,
                         "predicted_speedup": table.whole_s / predicted, "measured_s": t_pruned,
                         "original_s": t_original, "speedup": speedup, "importance": solution.importance,
                         "rows_changed": sum(not o.original for o in chosen)})
        log.info(f"layermerge: attempt {attempt}: predicted {table.whole_s / predicted:.3f}x ({1e3 * predicted:.2f} ms), "
            f"measured {speedup:.3f}x ({1e3 * t_original:.2f} -> {1e3 * t_pruned:.2f} ms; target {target}x)")
        plan.predicted = {"latency_s": predicted, "importance": solution.importance, "backend": table.backend,
                          "batch": how.batch, "attempts": attempts, "whole_s": table.whole_s,
                          "fixed_s": table.fixed_s, "table_rows": len(dp_rows),
                          "rows": [_describe(r, dp_rows) for r in solution.rows if not r.key.original]}
        results.append(SpeedupResult(pruned, plan, target, speedup, t_original, t_pruned, predicted,
                                     speedup >= target, attempts, stages, table, verification, provider_used, curve,
                                     notes=notes, rounds_s=rounds_s))
        if target <= speedup <= target * (1 + OVERSHOOT):
            break
        if speedup < target:
            chain_budget = tightened_budget(table.whole_s, predicted, speedup, target) - table.fixed_s
        else:
            log.info(f"layermerge: {speedup:.3f}x overshoots the {target}x target by more than "
                     f"{100 * OVERSHOOT:g}%: solving again with a looser budget")
            chain_budget = loosened_budget(table.whole_s, predicted, speedup, target) - table.fixed_s
    met = [r for r in results if r.met]
    # the met plan closest to the target from above (the least accuracy given for speed); a miss: the fastest
    return min(met, key=lambda r: r.speedup) if met else max(results, key=lambda r: r.speedup)


def _describe(row: dp.Row, rows: list[dp.Row] = ()) -> dict:
    """A chosen row as the plan records it; ``original_latency_s``: what the original rows it replaces cost (in
    ``rows``), so that latency_s - original_latency_s is what it saves."""
    o = row.key
    kind = ("replace block by a map" if o.fitted_map else "remove block" if o.remove_block
            else "merge" if len(o.keep) > 1 or o.fold_identity else "prune")
    replaced = sum(r.latency for r in rows if r.key.original and row.start <= r.start and r.end <= row.end)
    return {"kind": kind, "positions": [o.start, o.end], "keep": list(o.keep), "drop": list(o.drop),
            "kernel": list(o.kernel), "depthwise": o.depthwise, "block": o.remove_block or o.fold_identity,
            "latency_s": row.latency, "importance": row.importance, "original_latency_s": replaced}


def _map_options(baseline: onnx.ModelProto, options: list[Option], data: Dataset, repair: RepairOptions,
                 provider: str) -> tuple[list[Option], dict[str, tuple], list[str]]:
    """``options`` with, for every block-removal option, its twin that puts a fitted map in the block's place
    (planning.blocks.replace_options); the maps that score them (join -> (cut, map), fitted independently on
    ``data``: repair.blocks); notes on blocks that get no such option."""
    cuts, notes = block_cuts(baseline, [o.remove_block for o in options if o.remove_block], repair.fold)
    fitted, _ = fit_block_maps(baseline, cuts, data, repair, provider)
    log.info(f"layermerge: {len(fitted)} blocks may be replaced by a fitted map "
             f"({sum(c.fitted_map.folds for c in cuts.values())} of them fold into a neighbour)")
    maps = {join: (c.cut, fitted[join]) for join, c in cuts.items()}
    return options + blocks.replace_options(options, {j: c.fitted_map for j, c in cuts.items()}), maps, notes


def _timed_map_rows(rows: list, table: LatencyTable, structure) -> tuple[list, list[str]]:
    """``rows`` without the map options whose row a given latency table lacks (measured without repair), and a
    note for each: their cost would be a guess."""
    kept, notes = [], []
    for r in rows:
        signature = row_signature(r.option, structure, table.batch) if r.option.fitted_map else None
        if signature is not None and signature not in table.rows:
            notes.append(f"replacing block {r.option.remove_block} by a map left out: the latency table has no row "
                         f"'{signature}' (it was measured without repair)")
            continue
        kept.append(r)
    return kept, notes


def _with_maps(how: Measurement, reference: onnx.ModelProto | None, repair: RepairOptions | None,
               plan: Plan) -> Measurement:
    """``how`` timing a candidate with placeholder maps at the blocks ``plan`` replaces by maps (and nowhere else),
    when repair follows; else ``how`` itself."""
    if repair is None or reference is None:
        return how
    blocks_mapped = tuple(plan.repair_blocks or ())
    return dataclasses.replace(how, timed=lambda pruned: with_placeholder_maps(pruned, reference, repair.fold,
                                                                               blocks_mapped))


def _pareto(rows: list[dp.Row], positions: int, table: LatencyTable) -> list[dict]:
    """The whole predicted trade-off curve (latency against summed importance), from one DP table."""
    original = sum(r.latency for r in rows if r.key.original)
    unit = original / UNITS
    # Up to the original's latency plus the rounding slack of each position, so the original is on the curve.
    return [{"predicted_latency_s": table.fixed_s + point.latency,
             "predicted_speedup": table.whole_s / (table.fixed_s + point.latency),
             "importance": point.importance, "rows_changed": sum(not r.key.original for r in point.rows)}
            for point in dp.pareto(rows, positions, original + positions * unit, unit)]


def slp_to_speedup(model: onnx.ModelProto, data: Dataset, feature: str, target: float, how: Measurement,
                   min_blocks_per_stage: int = 1, provider: str = "auto", data_batch: int = 64) -> SpeedupResult:
    """SLP, one block at a time, until the speed-up measured as ``how`` says meets ``target``."""
    measured: dict[str, float] = {}

    baseline = normalized(model)

    def fast_enough(current: onnx.ModelProto) -> bool:
        t_original, t_pruned, speedup, rounds_s = _measure(baseline, current, how, measured.get("first"))
        measured.update(original=t_original, pruned=t_pruned, speedup=speedup, rounds_s=rounds_s)
        measured.setdefault("first", t_original)
        log.info(f"slp: measured {speedup:.3f}x (target {target}x)")
        return speedup >= target

    clock = time.perf_counter()
    result = prune_slp(model, data, feature, TargetOptions(min_blocks_per_stage=min_blocks_per_stage),
                       ScoringOptions(provider=provider), data_batch, until=fast_enough)
    pruned, verification = _applied_and_verified(model, result.plan, data)
    speedup = measured.get("speedup", 1.0)
    return SpeedupResult(pruned, result.plan, target, speedup, measured.get("original", 0.0),
                         measured.get("pruned", 0.0), None, speedup >= target,
                         stages={"slp": time.perf_counter() - clock}, verification=verification,
                         provider=result.provider, rounds_s=measured.get("rounds_s", []),
                         note="" if result.target_met else f"{result.message} (--min-blocks-per-stage lowers it)")


def _applied_and_verified(model: onnx.ModelProto, plan: Plan, data: Dataset) -> tuple[onnx.ModelProto, Verification]:
    pruned, _ = apply_plan(model, plan)
    verification = verify(model, pruned, feeds=next(data.batches(16)).feeds)
    if not verification.passed:
        raise VerificationFailed(f"the pruned model failed verification: {verification.summary()}")
    return pruned, verification


def sglp_to_speedup(model: onnx.ModelProto, data: Dataset, target: float, how: Measurement,
                    segments: int | None = None, provider: str = "auto", data_batch: int = 64) -> SpeedupResult:
    """SGLP (one shot: the CKA matrix, segments and GradNorms of the original), its plans for 1, 2, ... blocks in turn,
    until the speed-up measured as ``how`` says meets ``target``."""
    measured: dict[str, float] = {}
    baseline = normalized(model)
    speedups: list[float] = []

    def fast_enough(current: onnx.ModelProto) -> bool:
        t_original, t_pruned, speedup, rounds_s = _measure(baseline, current, how, measured.get("first"))
        measured.update(original=t_original, pruned=t_pruned, speedup=speedup, rounds_s=rounds_s)
        measured.setdefault("first", t_original)
        speedups.append(speedup)
        log.info(f"sglp: measured {speedup:.3f}x (target {target}x)")
        return speedup >= target

    clock = time.perf_counter()
    result = prune_sglp(model, data, until=fast_enough, segments=segments, provider=provider, batch=data_batch)
    for entry, speedup in zip(result.plan.predicted["history"], speedups):
        entry["measured_speedup"] = speedup
    pruned, verification = _applied_and_verified(model, result.plan, data)
    speedup = measured.get("speedup", 1.0)
    return SpeedupResult(pruned, result.plan, target, speedup, measured.get("original", 0.0),
                         measured.get("pruned", 0.0), None, speedup >= target,
                         stages={"sglp": time.perf_counter() - clock, **result.scores.seconds},
                         verification=verification, provider=result.provider, note=result.message,
                         rounds_s=measured.get("rounds_s", []))
