"""The public API: one function per CLI verb, taking paths and option objects (onnxprune.options), returning a
result object (onnxprune.results: typed attributes, and ``to_dict()``, what the CLI prints; docs/api.md). Progress
goes to the ``onnxprune`` logger."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import onnx

from onnxprune import outputs
from onnxprune.data.preprocess import Preprocess, preprocess_of
from onnxprune.data.sources import load_data, model_inputs, static_batch
from onnxprune.errors import MissingDependency, OnnxPruneError, VerificationFailed
from onnxprune.evaluate import evaluate_logits, logits_of
from onnxprune.graph.analysis import Structure, analyze_model
from onnxprune.graph.io import load_model, load_notes, save_model, specialise_inputs
from onnxprune.graph.normalize import to_graph
from onnxprune.importance.sglp import prune_sglp
from onnxprune.importance.slp import prune_slp, removal_candidates, score_blocks
from onnxprune.latency.backends import BACKENDS, Backend, get_backend
from onnxprune.latency.measure import compare
from onnxprune.latency.table import build_table, load_table
from onnxprune.options import (DataOptions, GateTrainingOptions, HealingOptions, LatencyOptions, OutputOptions,
                               RayOptions, RepairOptions, ScoringOptions, TargetOptions, check_method)
from onnxprune.plan import Plan, apply_plan, fingerprint, load_plan, save_plan
from onnxprune.results import (ApplyResult, BenchResult, DemoResult, EvalResult, HealResult, LatencyResult, PruneResult,
                               RepairResult, ScoreResult, TrainPruneResult)
from onnxprune.planning.blocks import replace_options, search_space
from onnxprune.planning.candidates import conv_l1_norms
from onnxprune.repair.blocks import block_cuts
from onnxprune.repair.linear import reference_of, repair as repair_model, with_placeholder_maps
from onnxprune.runtime.capture import feature_tensor as find_feature_tensor
from onnxprune.runtime.compare import memory_budget
from onnxprune.runtime.session import create_session
from onnxprune.speedup import MEASURE_ROUNDS, Measurement, layermerge_to_speedup, normalized, sglp_to_speedup, slp_to_speedup
from onnxprune.verify import verify

log = logging.getLogger(__name__)


def analyze(model_path: str | os.PathLike[str]) -> Structure:
    """Residual blocks and the conv chain of the model at ``model_path`` (see onnxprune.graph.analysis)."""
    return analyze_model(load_model(model_path))


def apply(model_path: str | os.PathLike[str], plan_path: str | os.PathLike[str],
          out_path: str | os.PathLike[str]) -> ApplyResult:
    """Apply the plan at ``plan_path`` to the model, verify the result, write it to ``out_path``.

    Nothing is written when the plan is refused or the result fails verification.
    """
    _refuse_overwrite(model_path, out_path)
    original = load_model(model_path)
    plan = load_plan(plan_path)
    rewritten, summary = apply_plan(original, plan)
    verification = verify(original, rewritten, preserves_function=not summary["changes_function"])
    if not verification.passed:
        raise VerificationFailed(f"the rewritten model failed verification; nothing written. {verification.summary()}")
    save_model(rewritten, out_path)
    return ApplyResult.from_dict({"output": str(out_path), "plan": summary, "verification": verification.to_dict(),
                                  "verification_text": verification.summary()})


def evaluate(model_path: str | os.PathLike[str], data: DataOptions = DataOptions(), reference: str | None = None,
             provider: str = "auto") -> EvalResult:
    """Top-1 accuracy on ``data`` (when it has labels) and agreement with ``reference``."""
    model = load_model(model_path)
    dataset = _dataset(model, data)
    if dataset.labels is None and reference is None:
        raise OnnxPruneError("nothing to evaluate: the data has no labels (give --labels) and no --reference was given")
    session = create_session(model, provider)
    logits = logits_of(session, dataset, data.batch)
    reference_logits = None
    if reference is not None:
        reference_model = load_model(reference)
        _refuse_other_inputs(model, reference_model, "the model and --reference")
        reference_logits = logits_of(create_session(reference_model, provider), dataset, data.batch)
    result = evaluate_logits(logits, dataset.labels, reference_logits)
    result.update(model=str(model_path), reference=reference, data=dataset.source, random_data=dataset.random,
                  provider=session.provider)
    return EvalResult.from_dict(result)


def _refuse_other_inputs(model: onnx.ModelProto, other: onnx.ModelProto, which: str) -> None:
    """Refuse two models that cannot take the same data: other input names, dtypes, ranks or fixed sizes (a symbolic
    size matches any)."""
    def same(a, b) -> bool:
        return (a.name, a.dtype, len(a.shape)) == (b.name, b.dtype, len(b.shape)) and all(
            x is None or y is None or x == y for x, y in zip(a.shape, b.shape))

    mine, theirs = model_inputs(model), model_inputs(other)
    if len(mine) != len(theirs) or not all(same(a, b) for a, b in zip(mine, theirs)):
        shown = [[(i.name, ["?" if d is None else d for d in i.shape], str(i.dtype)) for i in m] for m in (mine, theirs)]
        raise OnnxPruneError(f"{which} take different inputs: {shown[0]} and {shown[1]}")


def _refuse_overwrite(model_path, out_path) -> None:
    if Path(out_path).resolve() == Path(model_path).resolve():
        raise OnnxPruneError("the output path is the input model: onnxprune never overwrites its input")


def on_cluster(ray: RayOptions | None) -> contextlib.AbstractContextManager:
    """The block connected to the Ray cluster ``ray`` names (onnxprune.scaleout.cluster.connect), or a plain block
    without one: onnxprune.scaleout, and Ray, are imported only when a run asks for Ray."""
    if ray is None or ray.address is None:
        return contextlib.nullcontext()
    from onnxprune.scaleout import cluster

    return cluster.connect(ray)


def _dataset(model: onnx.ModelProto, data: DataOptions):
    overrides = data.preprocess_overrides
    prep = None
    if any(v is not None for v in overrides.values()):
        prep = (preprocess_of(model) or Preprocess()).with_overrides(**overrides)
    return load_data(data.source, model, samples=data.samples, seed=data.seed, preprocess=prep, labels=data.labels)


def _specialised(model: onnx.ModelProto, data: DataOptions):
    """(model, data set): a model whose input sizes after the batch are symbolic is fixed at ``data.input_shape``,
    else at the data's sizes (latency rows and merged convs need them), with a note on the log."""
    inputs = [i for i in model_inputs(model) if any(d is None for d in i.shape[1:])]
    if inputs and data.input_shape:
        model = specialise_inputs(model, {inputs[0].name: data.input_shape})
    dataset = _dataset(model, data)
    inputs = [i for i in model_inputs(model) if any(d is None for d in i.shape[1:])]
    if inputs:
        shapes = {i.name: tuple(dataset.inputs[i.name].shape[1:]) for i in inputs}
        model = specialise_inputs(model, shapes)
    for name, shape in (shapes if inputs else {}).items():
        log.info(f"note: input {name} has symbolic sizes: analysed, timed and rewritten at the data's {list(shape)}; "
                 "the pruned model takes that size")
    return model, dataset


def _feature(model, name: str | None) -> str:
    if name is None:
        return find_feature_tensor(model)
    known = {t for n in model.graph.node for t in n.output}
    if name not in known:
        raise OnnxPruneError(f"--feature-tensor {name!r} is not a tensor of the model")
    return name


def score(model_path: str | os.PathLike[str], data: DataOptions = DataOptions(),
          scoring: ScoringOptions = ScoringOptions(), ray: RayOptions | None = None) -> ScoreResult:
    """SLP score (1 - CKA at the feature tensor) of every removable block; lower = less important. With ``ray``, one
    Ray task per block (docs/scale-out.md): the same scores."""
    model, dataset = _specialised(load_model(model_path), data)
    feature = _feature(model, scoring.feature_tensor)
    structure = analyze_model(model)
    with on_cluster(ray):
        run = score_blocks(model, dataset, removal_candidates(structure, 0), feature, scoring.provider, data.batch,
                           memory_budget=scoring.memory_budget)
    return ScoreResult.from_dict({"model": str(model_path), "feature_tensor": feature, "data": dataset.source,
                                  "random_data": dataset.random, "samples": run.samples, "provider": run.provider,
                                  "seconds": run.seconds, "blocks": [vars(s) for s in run.scores]})


def prune(model_path: str | os.PathLike[str], target: TargetOptions, output: OutputOptions,
          data: DataOptions = DataOptions(), scoring: ScoringOptions = ScoringOptions(),
          latency: LatencyOptions = LatencyOptions(), healing: HealingOptions | None = None,
          heal_data: DataOptions | None = None, repair: RepairOptions | None = None,
          ray: RayOptions | None = None) -> PruneResult:
    """Prune, verify, and write the model and its plan (``output.plan``, else ``<output.model>.plan.json``).

    With ``target.speedup``, prune until the speed-up measured on ``latency.backend`` meets it. With ``repair``,
    a fitted linear map goes into every cut the pruning left (``repair``; fitted on the calibration data) and,
    with a speed-up target, the repaired model's speed-up is measured again: it is the one reported. With
    ``heal_data``, the pruned (or repaired) model is then healed on it (``heal``) and the healed model is what is
    written; the result gives agreement (and accuracy, for labelled data) before pruning, after pruning and after
    healing. With ``ray``, scoring, the latency table and healing run on that Ray cluster (docs/scale-out.md)."""
    check_method(target, scoring, latency, output)
    _refuse_overwrite(model_path, output.model)
    if heal_data is not None and heal_data.source in (None, "random"):
        raise OnnxPruneError("--heal-data needs real data: random inputs teach nothing")
    model, dataset = _specialised(load_model(model_path), data)
    if repair is not None and dataset.random:
        raise OnnxPruneError("--repair needs real calibration data (--data): a map fitted on random inputs "
                             "repairs nothing")
    with on_cluster(ray):
        result = _prune_and_write(model, dataset, target, output, data, scoring, latency, repair)
        if repair is not None:
            _repair_written(model, dataset, repair, scoring.provider, target, latency, output, result)
        if heal_data is None:
            return PruneResult.from_dict(result)
        healing = healing or HealingOptions()
        healed, stages = heal_and_measure(load_model(output.model), model, _dataset(model, heal_data), healing,
                                          scoring.provider, ray)
    plan = load_plan(result["plan"])
    plan.healing = healed["record"]
    save_model(healed["model"], output.model)
    save_plan(plan, result["plan"])
    target_check = agreement_target(stages, healing)
    result.update(stages, healing=_brief(healed["record"]), healed_verification=healed["verification"].to_dict())
    if result["target_met"] and not target_check["target_met"]:
        result.update(target_check)
    return PruneResult.from_dict(result)


def _prune_and_write(model, dataset, target: TargetOptions, output: OutputOptions, data: DataOptions,
                     scoring: ScoringOptions, latency: LatencyOptions, repair: RepairOptions | None = None) -> dict:
    if dataset.random:
        log.warning("warning: no --data given: scoring on RANDOM inputs, which says little about real data")
    feature = _feature(model, scoring.feature_tensor)
    _refuse_nothing_to_prune(analyze_model(model), target)
    if target.speedup is not None:
        with memory_budget(scoring.memory_budget):  # reaches the scoring calls inside onnxprune.speedup
            return _sglp_outputs(_prune_to_speedup(model, dataset, feature, target, output, data, scoring, latency,
                                                   repair), output)
    if target.method == "sglp":
        result = prune_sglp(model, dataset, remove_blocks=target.remove_blocks, segments=target.segments,
                            provider=scoring.provider, batch=data.batch)
    else:
        result = prune_slp(model, dataset, feature, target, scoring, data.batch)
    pruned, _ = apply_plan(model, result.plan)
    feeds = next(dataset.batches(min(data.batch, 16))).feeds
    verification = verify(model, pruned, feeds=feeds)
    if not verification.passed:
        raise VerificationFailed(f"the pruned model failed verification; nothing written. {verification.summary()}")
    plan_path = _plan_path(output)
    save_model(pruned, output.model)
    save_plan(result.plan, plan_path)
    predicted = result.plan.predicted
    return _sglp_outputs({"output": str(output.model), "plan": str(plan_path), "method": result.plan.method,
            "removed_blocks": result.plan.remove_blocks, "macs_before": predicted["macs_before"],
            "macs_after": predicted["macs_after"], "macs_reduction": 1 - predicted["macs_after"] / predicted["macs_before"],
            "target_met": result.target_met, "message": result.message, "provider": result.provider,
            "data": dataset.source, "random_data": dataset.random, "history": result.history, "notes": load_notes(model),
            "verification": verification.to_dict(), "verification_text": verification.summary()}, output)


def _sglp_outputs(result: dict, output: OutputOptions) -> dict:
    """For an SGLP plan: its segments (blocks, removed) in ``result``, and with ``output.plot`` the CKA matrix and
    the segment boundaries drawn beside the model (OUT with .cka.png)."""
    if result["method"] != "sglp":
        return result
    from onnxprune.report.png import cka_plot

    predicted = load_plan(result["plan"]).predicted
    result["segments"] = [{"blocks": s["blocks"], "removed": [j for j in s["blocks"] if j in result["removed_blocks"]]}
                          for s in predicted["segments"]]
    result["segments_chosen_by"] = predicted["segments_chosen_by"]
    result["grad_norm_targets"] = predicted["grad_norm_targets"]
    if output.plot:
        starts = [s["layers"][0] for s in predicted["segments"]]
        result["plot"] = cka_plot(Path(output.model).with_suffix(".cka.png"), predicted["cka"], starts)
    return result


def _repair_written(model, dataset, options: RepairOptions, provider: str, target: TargetOptions,
                    latency: LatencyOptions, output: OutputOptions, result: dict) -> None:
    """Repair the pruned model just written (only at the blocks its plan's ``repair_blocks`` names, when it names
    them), rewrite it and its plan, and update ``result`` (speed-up included)."""
    plan = load_plan(result["plan"])
    repaired = repair_and_measure(load_model(output.model), model, dataset, options, provider, plan.repair_blocks)
    plan.repair = repaired["record"]
    save_model(repaired["model"], output.model)
    save_plan(plan, result["plan"])
    result.update(repair=repaired["record"], repair_agreement=repaired["agreement"],
                  repaired_verification=repaired["verification"].to_dict())
    if target.speedup is not None:
        timing = get_backend(latency.backend, latency.threads)
        measured = compare([normalized(model), repaired["model"]], timing, result["latency_batch"],
                           latency.rounds or MEASURE_ROUNDS)
        speedup = measured.speedups[1]
        result.update(measured_speedup_in_search=result["measured_speedup"], measured_speedup=speedup,
                      original_latency_s=measured.medians[0], pruned_latency_s=measured.medians[1],
                      latency_rounds_s=_rounds(measured.times), target_met=speedup >= target.speedup)
        result["message"] = "" if result["target_met"] else (
            f"measured {speedup:.3f}x with the repair maps misses the {target.speedup}x target by "
            f"{100 * (target.speedup / speedup - 1):.1f}%")


def repair_and_measure(pruned: onnx.ModelProto, original: onnx.ModelProto, dataset, options: RepairOptions,
                       provider: str = "auto", blocks: list[str] | None = None) -> dict:
    """Repair ``pruned`` (onnxprune.repair.linear), verify it, and measure top-1 agreement with ``original`` of the
    pruned and the repaired model on ``dataset`` (the data the maps were fitted on: an optimistic figure)."""
    result = repair_model(pruned, original, dataset, options, provider, blocks)
    feeds = next(dataset.batches(min(options.batch, 16))).feeds
    verification = verify(pruned, result.model, feeds=feeds)
    if not verification.passed:
        raise VerificationFailed(f"the repaired model failed verification; nothing written. {verification.summary()}")
    batch = dataset.static_batch or options.batch
    logits = {name: logits_of(create_session(m, provider), dataset, batch)
              for name, m in (("original", original), ("pruned", pruned), ("repaired", result.model))}
    agreement = {name: evaluate_logits(logits[name], None, logits["original"]).get("agreement")
                 for name in ("pruned", "repaired")}
    return {"model": result.model, "record": result.record, "verification": verification, "agreement": agreement}


def _refuse_nothing_to_prune(structure, target: TargetOptions) -> None:
    """Refuse, before anything is measured, a model the method finds nothing in."""
    if target.method in ("slp", "sglp") and not any(b.removable for b in structure.residual_blocks):
        reasons = sorted({b.reason for b in structure.residual_blocks})
        raise OnnxPruneError(f"{target.method.upper()} has nothing to remove: the model has no removable residual block ("
                             + (f"{len(structure.residual_blocks)} blocks: {'; '.join(reasons)}" if reasons else
                                "no residual join found") + "); try --method layermerge --speedup X")
    if target.method == "layermerge" and not structure.convs and not any(b.removable for b in structure.residual_blocks):
        raise OnnxPruneError("LayerMerge has nothing to merge or remove: no conv chain and no removable residual block")


def _plan_path(output: OutputOptions) -> Path:
    return Path(output.plan) if output.plan else Path(output.model).with_suffix(".plan.json")


def latency_batch(model: onnx.ModelProto, latency: LatencyOptions) -> int:
    """The batch latency is measured at: the one asked for, else the model's fixed batch, else 1."""
    fixed = static_batch(model)
    if latency.batch is not None and fixed is not None and latency.batch != fixed:
        raise OnnxPruneError(f"the model takes batches of exactly {fixed} (a fixed batch dimension): "
                             f"it cannot be timed at batch {latency.batch}")
    if latency.batch is not None and latency.batch < 1:
        raise OnnxPruneError(f"the latency batch must be at least 1, not {latency.batch}")
    return latency.batch or fixed or 1


def _prune_to_speedup(model, dataset, feature, target: TargetOptions, output: OutputOptions, data: DataOptions,
                      scoring: ScoringOptions, latency: LatencyOptions, repair: RepairOptions | None = None) -> dict:
    timing = get_backend(latency.backend, latency.threads)
    # With repair to follow, every candidate is timed with placeholder maps where the fitted ones will go.
    timed = None
    if repair is not None:
        reference = reference_of(model)
        timed = lambda pruned: with_placeholder_maps(pruned, reference, repair.fold)  # noqa: E731
    batch = latency_batch(model, latency)
    how = Measurement(timing, batch, latency.rounds, timed)
    if target.method == "layermerge":
        table = load_table(latency.table, fingerprint(model)) if latency.table else None
        if table is not None and table.batch != batch:
            raise OnnxPruneError(f"the latency table was measured at batch {table.batch}, not {batch}")
        result = layermerge_to_speedup(model, dataset, feature, target.speedup, how, scoring, data.batch, table,
                                       with_pareto=output.pareto is not None or output.curve, repair=repair)
        if output.pareto is not None:
            outputs.write_text(output.pareto, json.dumps(result.pareto, indent=1) + "\n")
    elif target.method == "sglp":
        result = sglp_to_speedup(model, dataset, target.speedup, how, target.segments, scoring.provider, data.batch)
    else:
        result = slp_to_speedup(model, dataset, feature, target.speedup, how, target.min_blocks, scoring.provider,
                                data.batch)
    plan_path = _plan_path(output)
    save_model(result.model, output.model)
    save_plan(result.plan, plan_path)
    before, after = analyze_model(model).macs, analyze_model(load_model(output.model)).macs
    speedup = target.speedup
    return {"output": str(output.model), "plan": str(plan_path), "method": target.method, "target_speedup": speedup,
            "measured_speedup": result.speedup, "original_latency_s": result.original_s,
            "pruned_latency_s": result.pruned_s, "predicted_latency_s": result.predicted_s,
            "target_met": result.met,
            "message": "" if result.met else f"measured {result.speedup:.3f}x misses the {speedup}x target by "
                                             f"{100 * (speedup / result.speedup - 1):.1f}%"
                                             + (f": {result.note}" if result.note else ""),
            "backend": timing.describe(), "latency_batch": batch, "attempts": result.attempts,
            "stages_s": result.stages, "removed_blocks": result.plan.remove_blocks,
            "merged": result.plan.merge, "dropped_convs": result.plan.drop_convs,
            "dropped_activations": result.plan.drop_activations, "macs_before": before, "macs_after": after,
            "macs_reduction": 1 - after / before, "data": dataset.source, "random_data": dataset.random,
            "provider": result.provider, "notes": load_notes(model) + result.notes, "verification": result.verification.to_dict(),
            "verification_text": result.verification.summary(),
            **({"latency_rounds_s": _rounds(result.rounds_s)} if result.rounds_s else {}),
            **({"pareto": result.pareto} if output.curve and result.pareto else {})}


def _rounds(times: list[list[float]]) -> dict:
    """The seconds of one run of the original and of the pruned model in every round of a side-by-side measurement
    (their distributions; the medians are original_latency_s and pruned_latency_s)."""
    return {"original": list(times[0]), "pruned": list(times[1])}


def heal(model_path: str | os.PathLike[str], teacher_path: str | os.PathLike[str], output: OutputOptions,
         data: DataOptions, healing: HealingOptions = HealingOptions(), provider: str = "auto",
         ray: RayOptions | None = None) -> HealResult:
    """Heal the pruned model at ``model_path`` against its original at ``teacher_path`` (onnxprune.train.heal; with
    ``ray``, on Ray Train workers: onnxprune.scaleout.heal), verify it, and write it with its plan: the pruned
    model's plan (``<model>.plan.json`` when there is one) with what healing did added."""
    pruned, teacher, dataset = _pruned_and_teacher(model_path, teacher_path, output, data,
                                                   "healing needs real data (--data): random inputs teach nothing")
    with on_cluster(ray):
        healed, stages = heal_and_measure(pruned, teacher, dataset, healing, provider, ray)
    plan = _source_plan(model_path, teacher)
    plan.healing = healed["record"]
    plan_path = _plan_path(output)
    save_model(healed["model"], output.model)
    save_plan(plan, plan_path)
    return HealResult.from_dict({
        "output": str(output.model), "plan": str(plan_path), "teacher": str(teacher_path), "data": dataset.source,
        **stages, **agreement_target(stages, healing), "healing": _brief(healed["record"]),
        "verification": healed["verification"].to_dict(), "verification_text": healed["verification"].summary()})


def _pruned_and_teacher(model_path, teacher_path, output: OutputOptions, data: DataOptions, no_random: str):
    """(pruned model, its original, the data) for a verb that works on a pruned model against its original."""
    for source in (model_path, teacher_path):
        _refuse_overwrite(source, output.model)
    pruned, teacher = load_model(model_path), load_model(teacher_path)
    if [o.name for o in pruned.graph.output] != [o.name for o in teacher.graph.output]:
        raise OnnxPruneError("the pruned model and --teacher have different outputs: is the teacher its original?")
    _refuse_other_inputs(pruned, teacher, "the pruned model and --teacher")
    dataset = _dataset(pruned, data)
    if dataset.random:
        raise OnnxPruneError(no_random)
    for model, which in ((pruned, "the pruned model"), (teacher, "--teacher")):
        _refuse_unrunnable(model, dataset, which)
    return pruned, teacher, dataset


def _refuse_unrunnable(model: onnx.ModelProto, dataset, which: str) -> None:
    """Refuse a model that onnxruntime cannot run on the data's first batch (a damaged graph: an attribute out of
    range, a missing input), before a torch copy of it trips over the same later."""
    try:
        create_session(model, "cpu").run(next(dataset.batches(8)).feeds)
    except OnnxPruneError as exc:
        raise OnnxPruneError(f"{which}: {exc}") from exc


def _source_plan(model_path, teacher: onnx.ModelProto) -> Plan:
    """The pruned model's plan (``<model>.plan.json``) when there is one, else an empty plan for its original."""
    source_plan = Path(model_path).with_suffix(".plan.json")
    return load_plan(source_plan) if source_plan.exists() else Plan(fingerprint=fingerprint(teacher), method=None)


def repair(model_path: str | os.PathLike[str], teacher_path: str | os.PathLike[str], output: OutputOptions,
           data: DataOptions, options: RepairOptions = RepairOptions(), provider: str = "auto") -> RepairResult:
    """Repair the pruned model at ``model_path`` against its original at ``teacher_path`` without training
    (onnxprune.repair.linear), verify it, and write it with its plan (the pruned model's, with the repair added)."""
    pruned, teacher, dataset = _pruned_and_teacher(
        model_path, teacher_path, output, data, "repair needs real data (--data): a map fitted on random inputs "
                                                "repairs nothing")
    plan = _source_plan(model_path, teacher)
    repaired = repair_and_measure(pruned, teacher, dataset, options, provider, plan.repair_blocks)
    plan.repair = repaired["record"]
    plan_path = _plan_path(output)
    save_model(repaired["model"], output.model)
    save_plan(plan, plan_path)
    return RepairResult.from_dict({
        "output": str(output.model), "plan": str(plan_path), "teacher": str(teacher_path), "data": dataset.source,
        "agreement": repaired["agreement"], "repair": repaired["record"],
        "verification": repaired["verification"].to_dict(), "verification_text": repaired["verification"].summary()})


def train_prune(model_path: str | os.PathLike[str], output: OutputOptions, data: DataOptions,
                options: GateTrainingOptions = GateTrainingOptions(), teacher_path: str | None = None,
                latency: LatencyOptions = LatencyOptions(), provider: str = "auto") -> TrainPruneResult:
    """Train the model with learned Bernoulli gates on its removable residual branches and prune the blocks whose
    gates close (onnxprune.train.gates; docs/algorithms.md section 5). Writes the model with the trained weights and
    the pruned blocks removed (verified), its plan (the run recorded under "training"), the thetas of every
    evaluation as JSON (OUT with .thetas.json) and their trajectories as a PNG (OUT with .thetas.png). With
    ``options.speedup``, pruning stops once the speed-up measured on ``latency.backend`` against the normalized
    original reaches it."""
    for source in (model_path, teacher_path):
        if source is not None:
            _refuse_overwrite(source, output.model)
    try:
        from onnxprune.train.gates import train_prune as train_gated
    except ImportError as exc:
        raise MissingDependency(f"train-prune needs torch: pip install 'onnxprune[torch]' ({exc})") from None
    from onnxprune.report.png import theta_plot

    model = load_model(model_path)
    dataset = _dataset(model, data)
    if dataset.random:
        raise OnnxPruneError("train-prune needs real data (--data): random inputs teach nothing")
    teacher = load_model(teacher_path) if teacher_path is not None else None
    if teacher is not None and [o.name for o in model.graph.output][:1] != [o.name for o in teacher.graph.output][:1]:
        log.info("note: the teacher's first output has another name than the model's; their first outputs are matched")
    timing = batch = baseline = None
    if options.speedup is not None:
        timing, batch = get_backend(latency.backend, latency.threads), latency_batch(model, latency)
        baseline = normalized(model)

    def measure(joins: list[str]) -> float:
        pruned_model = apply_plan(model, Plan(remove_blocks=list(joins)))[0]
        return compare([baseline, pruned_model], timing, batch, latency.rounds or MEASURE_ROUNDS).speedups[1]

    run = train_gated(model, dataset, options, teacher, provider, measure if options.speedup is not None else None)
    record = {k: v for k, v in run.record.items() if k != "trace"}
    plan = Plan(remove_blocks=run.removed, fingerprint=fingerprint(model), method="train-prune", training=record)
    pruned, summary = apply_plan(run.model, plan)
    held = dataset.subset(run.held_back)
    verification = verify(run.model, pruned, feeds=next(held.batches(min(data.batch, 16))).feeds)
    if not verification.passed:
        raise VerificationFailed(f"the pruned model failed verification; nothing written. {verification.summary()}")
    before, after = analyze_model(model).macs, analyze_model(pruned).macs
    plan.predicted = {"macs_before": before, "macs_after": after}
    result = {"output": str(output.model), "method": "train-prune", "removed_blocks": run.removed,
              "blocks": record["blocks"], "final_theta": record["final_theta"], "pruned_at": record["pruned_at"],
              "macs_before": before, "macs_after": after, "macs_reduction": 1 - after / before,
              "data": dataset.source, "training": {k: v for k, v in record.items() if k != "history"},
              "target_met": True, "message": ""}
    if options.speedup is not None:
        measured = compare([baseline, pruned], timing, batch, latency.rounds or MEASURE_ROUNDS)
        speedup = measured.speedups[1]
        plan.predicted.update(measured_speedup=speedup, backend=timing.describe(), latency_batch=batch)
        result.update(target_speedup=options.speedup, measured_speedup=speedup, original_latency_s=measured.medians[0],
                      pruned_latency_s=measured.medians[1], backend=timing.describe(), latency_batch=batch,
                      target_met=speedup >= options.speedup)
        if not result["target_met"]:
            result["message"] = (f"measured {speedup:.3f}x misses the {options.speedup}x target by "
                                 f"{100 * (options.speedup / speedup - 1):.1f}%")
    logits = {name: logits_of(create_session(m, provider), held, dataset.static_batch or 64)
              for name, m in (("original", model), ("pruned", pruned))}
    for name in logits:
        measured = evaluate_logits(logits[name], held.labels, logits["original"])
        result[f"held_back_{name}"] = {k: measured[k] for k in ("agreement", "accuracy", "mean_kl") if k in measured}
    plan_path = _plan_path(output)
    thetas_path = Path(output.model).with_suffix(".thetas.json")
    thetas = {"blocks": record["blocks"], "block_params": record["block_params"], "pruned_at": record["pruned_at"],
              "evaluations": [{k: e[k] for k in ("step", "epoch", "theta") if k in e} for e in record["history"]],
              "trace": run.record["trace"]}
    save_model(pruned, output.model)
    save_plan(plan, plan_path)
    outputs.write_text(thetas_path, json.dumps(thetas) + "\n")
    result.update(plan=str(plan_path), thetas=str(thetas_path),
                  plot=theta_plot(Path(output.model).with_suffix(".thetas.png"), run.record["trace"]),
                  verification=verification.to_dict(), verification_text=verification.summary())
    return TrainPruneResult.from_dict(result)


def agreement_target(stages: dict, healing: HealingOptions) -> dict:
    """target_met and message for ``healing.min_agreement`` (met when there is none)."""
    agreement = stages["after_healing"]["agreement"]
    if healing.min_agreement is None or agreement >= healing.min_agreement:
        return {"target_met": True, "message": ""}
    return {"target_met": False, "message": f"the healed model agrees with the original on {100 * agreement:.1f}% of "
                                            f"the held-back samples, under --min-agreement {healing.min_agreement}"}


def heal_and_measure(pruned: onnx.ModelProto, original: onnx.ModelProto, dataset, healing: HealingOptions,
                     provider: str = "auto", ray: RayOptions | None = None) -> tuple[dict, dict]:
    """Heal ``pruned`` on ``dataset`` (with ``ray``, on Ray Train workers of the connected cluster), verify the
    result, and measure agreement with ``original`` (and accuracy, when the data has labels) on the held-back part,
    by onnxruntime: before pruning, after pruning, after healing."""
    try:
        from onnxprune.train.heal import heal as heal_model
    except ImportError as exc:
        raise MissingDependency(f"healing needs torch: pip install 'onnxprune[torch]' ({exc})") from None
    if ray is not None and ray.address is not None:
        from onnxprune.scaleout.heal import heal_on_ray

        result = heal_on_ray(pruned, original, dataset, healing, ray, provider)
    else:
        result = heal_model(pruned, original, dataset, healing, provider)
    held = dataset.subset(result.split.held_back)
    verification = verify(pruned, result.model, feeds=next(held.batches(min(healing.batch, 16))).feeds)
    if not verification.passed:
        raise VerificationFailed(f"the healed model failed verification; nothing written. {verification.summary()}")
    sessions = {name: create_session(m, provider) for name, m in
                (("original", original), ("pruned", pruned), ("healed", result.model))}
    logits = {name: logits_of(s, held, dataset.static_batch or 64) for name, s in sessions.items()}
    stages = {}
    for stage, name in (("before_pruning", "original"), ("after_pruning", "pruned"), ("after_healing", "healed")):
        measured = evaluate_logits(logits[name], held.labels, logits["original"])
        stages[stage] = {k: measured[k] for k in ("agreement", "accuracy", "mean_kl") if k in measured}
    stages["held_back_samples"] = len(held)
    return {"model": result.model, "record": result.record, "verification": verification}, stages


def _brief(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "history"}


def latency(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
            latency: LatencyOptions = LatencyOptions(), input_shape: tuple[int, ...] | None = None,
            ray: RayOptions | None = None, repair: RepairOptions | None = None) -> LatencyResult:
    """Build the LayerMerge latency table of a model on ``latency.backend`` and write it to ``out_path``; a
    model with symbolic sizes after the batch is timed at ``input_shape`` (what ``prune --input-shape`` takes).
    With ``ray``, the rows are timed on Ray actors (docs/scale-out.md); the table says which timed which. With
    ``repair``, the table also has the rows of the fitted maps that may replace removed blocks (``prune --repair``
    leaves a block's map option out when its table lacks that row); a map's row depends on its shape only, so no
    data is needed."""
    model = load_model(model_path)
    if input_shape is not None:
        model = specialise_inputs(model, {model_inputs(model)[0].name: input_shape})
    structure = analyze_model(model)
    batch = latency_batch(model, latency)
    baseline = normalized(model)
    options = search_space(structure, conv_l1_norms(to_graph(model)))
    notes: list[str] = []
    if repair is not None:
        cuts, notes = block_cuts(baseline, [o.remove_block for o in options if o.remove_block], repair.fold)
        options = options + replace_options(options, {join: cut.fitted_map for join, cut in cuts.items()})
    with on_cluster(ray):
        table = build_table(baseline, structure, options, _table_backend(latency, ray), batch, fingerprint(model),
                            rounds=latency.rounds or 20)
    table.save(out_path)
    map_rows = sum(key.startswith("map ") for key in table.rows)
    result = {"output": str(out_path), "rows": len(table.rows), "options": len(options), "whole_s": table.whole_s,
              "fixed_s": table.fixed_s, **table.backend, "batch": batch, "rounds": table.rounds,
              "notes": notes + table.notes, **({"map_rows": map_rows} if repair is not None else {})}
    if table.timed_on:
        result["timed_on"] = sorted(set(table.timed_on.values()))
    return LatencyResult.from_dict(result)


def _table_backend(latency: LatencyOptions, ray: RayOptions | None) -> Backend:
    """The backend a latency table is timed on: made here, or with ``ray`` named only (each Ray actor makes it on its
    node, with that node's threads: this machine needs no GPU to time rows on the cluster's)."""
    if ray is None or ray.address is None:
        return get_backend(latency.backend, latency.threads)
    if latency.backend not in BACKENDS:
        raise OnnxPruneError(f"unknown backend {latency.backend!r}; choose one of {', '.join(BACKENDS)}")
    return Backend(latency.backend, latency.threads)


def bench(model_path: str | os.PathLike[str], other_path: str | os.PathLike[str] | None = None,
          latency: LatencyOptions = LatencyOptions()) -> BenchResult:
    """Latency of one model, or of two side by side (taking turns) with the second's speed-up."""
    timing = get_backend(latency.backend, latency.threads)
    models = [load_model(model_path)] + ([load_model(other_path)] if other_path else [])
    batch = latency_batch(models[0], latency)
    measured = compare(models, timing, batch, latency.rounds or 25)
    result = {"backend": timing.describe(), "batch": batch, "rounds": measured.rounds,
              "runs_per_turn": measured.runs_per_turn, "models": [
                  {"model": str(p), "latency_s": t, "rounds_s": times}
                  for p, t, times in zip([model_path, other_path], measured.medians, measured.times)]}
    if other_path:
        result["speedup"] = measured.speedups[1]
    return BenchResult.from_dict(result)


# The demo's files: kept once in the repository's models/, and copied into onnxprune/assets/ of a built wheel
# (setup.py), so that an installed onnxprune finds them too.
SHIPPED = ("resnet56.onnx", "cifar10_calib512.npz", "cifar10_test1000.npz")


def shipped(name: str) -> str:
    """Path of a file shipped with onnxprune (SHIPPED): models/<name> in the working folder, else the installed
    package's copy (onnxprune/assets/<name>), else models/<name> in the checkout this package was imported from."""
    package = Path(__file__).resolve().parent
    for path in (Path.cwd() / "models" / name, package / "assets" / name, package.parent / "models" / name):
        if path.exists():
            return str(path)
    raise OnnxPruneError(f"{name} is not shipped with this onnxprune (neither in {package / 'assets'} nor in a "
                         "checkout's models/): reinstall it from a wheel, or give --model/--data/--test-data")


# The demo heals label-free (what a user of an exported model usually has) on the shipped calibration images, in a
# short run: without mixup, which pays off over longer runs only (benchmarks/RESULTS.md, "Healing").
DEMO_HEALING = HealingOptions(steps=300, use_labels=False, mixup=False)


def demo(out_dir: str = "out/demo", model: str | None = None, calib: str | None = None, test: str | None = None,
         speedup: float = 1.5, method: str = "layermerge", latency: LatencyOptions = LatencyOptions(batch=32),
         samples: int = 256, healing: HealingOptions | None = DEMO_HEALING,
         repair: RepairOptions | None = RepairOptions()) -> DemoResult:
    """The whole pipeline on the shipped reference model: prune to ``speedup`` on ``latency.backend`` (with
    ``repair``: fitted maps at the cuts, timed in the search; None: no repair), heal on the calibration images
    (``healing``; None: no healing), then accuracy of the original, the pruned, the repaired and the healed model on
    the shipped test subset. The pruned model without maps is the plan applied alone (what ``apply`` gives)."""
    model = model or shipped("resnet56.onnx")
    calib = calib or shipped("cifar10_calib512.npz")
    test = test or shipped("cifar10_test1000.npz")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(model).stem}_{method}_{speedup:g}x"
    pruned_path, repaired_path = out / f"{stem}.onnx", out / f"{stem}_repaired.onnx"
    written = repaired_path if repair is not None else pruned_path
    pruned = prune(model, TargetOptions(method=method, speedup=speedup), OutputOptions(str(written)),
                   DataOptions(calib, samples=samples), latency=latency, repair=repair)
    if repair is not None:
        plain, _ = apply_plan(load_model(model), load_plan(pruned.plan))
        save_model(plain, pruned_path)
    accuracy = evaluate(pruned_path, DataOptions(test), reference=model)
    result = {"model": model, "pruned": pruned.to_dict(), "accuracy_before": accuracy.reference_accuracy,
              "accuracy_after": accuracy.accuracy, "agreement": accuracy.agreement, "test_data": accuracy.data,
              "pruned_model": str(pruned_path)}
    if repair is not None:
        repaired = evaluate(repaired_path, DataOptions(test), reference=model)
        result.update(accuracy_repaired=repaired.accuracy, agreement_repaired=repaired.agreement)
    if healing is not None:
        healed_path = out / f"{written.stem}_healed.onnx"
        healed = heal(written, model, OutputOptions(str(healed_path)), DataOptions(calib), healing)
        healed_accuracy = evaluate(healed_path, DataOptions(test), reference=model)
        result.update(healed=healed.to_dict(), accuracy_healed=healed_accuracy.accuracy,
                      agreement_healed=healed_accuracy.agreement)
    return DemoResult.from_dict(result)
