"""The functions ``import onnxprune`` offers a pipeline (docs/api.md): the verbs of onnxprune.api, taking either the
option objects the CLI builds (onnxprune.options) or plain keywords that build them for the common cases, and
returning the verb's result object (onnxprune.results)::

    import onnxprune
    result = onnxprune.prune("m.onnx", data="calib.npz", speedup=1.5, output="out.onnx")

A keyword and the option object it would go into are not given together (an OnnxPruneError says which). Three
verbs take another name here, as ``onnxprune.evaluate``, ``onnxprune.repair`` and ``onnxprune.latency`` are the
package's own modules: ``evaluate_model`` (eval), ``repair_model`` (repair), ``latency_table`` (latency).
"""

from __future__ import annotations

import os
from typing import Any

from onnxprune import api
from onnxprune.errors import OnnxPruneError
from onnxprune.options import (DataOptions, GateTrainingOptions, HealingOptions, LatencyOptions, OutputOptions,
                               RayOptions, RepairOptions, ScoringOptions, TargetOptions)
from onnxprune.results import (ApplyResult, BenchResult, DemoResult, EvalResult, HealResult, LatencyResult,
                               PruneResult, RepairResult, ScoreResult, TrainPruneResult)

PathLike = str | os.PathLike[str]

analyze = api.analyze


def _refuse_both(options: object, name: str, **keywords: Any) -> None:
    """Refuse keywords given beside the option object they would build."""
    given = sorted(k for k, v in keywords.items() if v is not None)
    if options is not None and given:
        raise OnnxPruneError(f"give {', '.join(given)} inside {name}, not beside it")


def data_options(data: DataOptions | PathLike | None, samples: int | None = None) -> DataOptions:
    """``data`` as DataOptions: a path (or "random", or None: random inputs) with ``samples``, or the object."""
    if isinstance(data, DataOptions):
        _refuse_both(data, "DataOptions", samples=samples)
        return data
    return DataOptions(None if data is None else os.fspath(data), samples=samples)


def output_options(output: OutputOptions | PathLike) -> OutputOptions:
    """``output`` as OutputOptions: the model's path (its plan beside it), or the object."""
    return output if isinstance(output, OutputOptions) else OutputOptions(os.fspath(output))


def ray_options(ray: RayOptions | str | None) -> RayOptions | None:
    """``ray``: RayOptions, or a cluster's address as ``--ray`` takes it ("auto", "local", HOST:PORT), or None (no
    Ray; docs/scale-out.md)."""
    return RayOptions(ray) if isinstance(ray, str) else ray


def latency_options(latency: LatencyOptions | None, backend: str | None = None, batch: int | None = None,
                    rounds: int | None = None) -> LatencyOptions:
    """``latency``, or LatencyOptions from the keywords (None: each one's default)."""
    _refuse_both(latency, "LatencyOptions", backend=backend, batch=batch, rounds=rounds)
    return latency or LatencyOptions(backend=backend or LatencyOptions.backend, batch=batch, rounds=rounds)


def prune(model: PathLike, data: DataOptions | PathLike | None = None, speedup: float | None = None, *,
          output: OutputOptions | PathLike, method: str | None = None, remove_blocks: int | None = None,
          macs_reduction: float | None = None, samples: int | None = None, backend: str | None = None,
          latency_batch: int | None = None, repair: RepairOptions | bool = False,
          heal_data: DataOptions | PathLike | None = None, heal_steps: int | None = None,
          min_agreement: float | None = None, target: TargetOptions | None = None,
          scoring: ScoringOptions | None = None, latency: LatencyOptions | None = None,
          healing: HealingOptions | None = None, ray: RayOptions | str | None = None) -> PruneResult:
    """``onnxprune prune``: prune ``model`` to ``speedup`` (measured), ``remove_blocks`` or ``macs_reduction``,
    with ``method`` (default: layermerge with a speed-up, else slp), or to ``target``; ``repair`` (True or
    RepairOptions) fits linear maps at the cuts; ``heal_data`` heals the result (``heal_steps``, ``min_agreement``
    or ``healing``); ``ray`` runs scoring, the latency table and healing on a Ray cluster. Writes ``output`` and
    its plan, verified."""
    _refuse_both(target, "TargetOptions", speedup=speedup, method=method, remove_blocks=remove_blocks,
                 macs_reduction=macs_reduction)
    if target is None:
        target = TargetOptions(method=method or ("layermerge" if speedup is not None else "slp"), speedup=speedup,
                               remove_blocks=remove_blocks, macs_reduction=macs_reduction)
    if heal_data is None and (healing is not None or heal_steps is not None or min_agreement is not None):
        raise OnnxPruneError("healing options need heal_data: the data to heal on")
    _refuse_both(healing, "HealingOptions", heal_steps=heal_steps, min_agreement=min_agreement)
    if heal_data is not None and healing is None:
        healing = HealingOptions(steps=heal_steps, min_agreement=min_agreement)
    return api.prune(model, target, output_options(output), data_options(data, samples), scoring or ScoringOptions(),
                     latency_options(latency, backend, latency_batch), healing,
                     None if heal_data is None else data_options(heal_data),
                     RepairOptions() if repair is True else (repair or None), ray_options(ray))


def heal(model: PathLike, teacher: PathLike, data: DataOptions | PathLike, *, output: OutputOptions | PathLike,
         steps: int | None = None, min_agreement: float | None = None, samples: int | None = None,
         healing: HealingOptions | None = None, provider: str = "auto",
         ray: RayOptions | str | None = None) -> HealResult:
    """``onnxprune heal``: train the pruned ``model`` back towards ``teacher`` (its original) on ``data``
    (``steps``, ``min_agreement``, or ``healing``; needs torch); ``ray``: on Ray Train workers."""
    _refuse_both(healing, "HealingOptions", steps=steps, min_agreement=min_agreement)
    healing = healing or HealingOptions(steps=steps, min_agreement=min_agreement)
    return api.heal(model, teacher, output_options(output), data_options(data, samples), healing, provider,
                    ray_options(ray))


def repair_model(model: PathLike, teacher: PathLike, data: DataOptions | PathLike, *,
                 output: OutputOptions | PathLike, samples: int | None = None, options: RepairOptions = RepairOptions(),
                 provider: str = "auto") -> RepairResult:
    """``onnxprune repair``: fit linear maps into the cuts of the pruned ``model`` against ``teacher``."""
    return api.repair(model, teacher, output_options(output), data_options(data, samples), options, provider)


def train_prune(model: PathLike, data: DataOptions | PathLike, *, output: OutputOptions | PathLike,
                steps: int | None = None, speedup: float | None = None, teacher: PathLike | None = None,
                samples: int | None = None, options: GateTrainingOptions | None = None,
                latency: LatencyOptions | None = None, provider: str = "auto") -> TrainPruneResult:
    """``onnxprune train-prune``: train ``model`` with gates on its residual branches and prune those that close
    (``steps``, ``speedup``, or ``options``; needs torch)."""
    _refuse_both(options, "GateTrainingOptions", steps=steps, speedup=speedup)
    options = options or GateTrainingOptions(steps=steps, speedup=speedup)
    return api.train_prune(model, output_options(output), data_options(data, samples), options,
                           None if teacher is None else os.fspath(teacher), latency or LatencyOptions(), provider)


def evaluate_model(model: PathLike, data: DataOptions | PathLike | None = None, *,
                   reference: PathLike | None = None, samples: int | None = None, provider: str = "auto") -> EvalResult:
    """``onnxprune eval``: top-1 accuracy on labelled ``data``, and agreement with ``reference``."""
    return api.evaluate(model, data_options(data, samples), None if reference is None else os.fspath(reference),
                        provider)


def score(model: PathLike, data: DataOptions | PathLike | None = None, *, samples: int | None = None,
          scoring: ScoringOptions | None = None, ray: RayOptions | str | None = None) -> ScoreResult:
    """``onnxprune score``: the SLP score of every removable residual block (``ray``: one Ray task per block)."""
    return api.score(model, data_options(data, samples), scoring or ScoringOptions(), ray_options(ray))


def apply(model: PathLike, plan: PathLike, output: PathLike) -> ApplyResult:
    """``onnxprune apply``: apply a plan, verify, write."""
    return api.apply(model, plan, output)


def bench(model: PathLike, other: PathLike | None = None, *, backend: str | None = None,
          batch: int | None = None, rounds: int | None = None, latency: LatencyOptions | None = None) -> BenchResult:
    """``onnxprune bench``: the latency of ``model``, or of ``model`` and ``other`` side by side."""
    return api.bench(model, other, latency_options(latency, backend, batch, rounds))


def latency_table(model: PathLike, output: PathLike, *, backend: str | None = None, batch: int | None = None,
                  rounds: int | None = None, latency: LatencyOptions | None = None,
                  input_shape: tuple[int, ...] | None = None, ray: RayOptions | str | None = None,
                  repair: RepairOptions | bool | None = None) -> LatencyResult:
    """``onnxprune latency``: the LayerMerge latency table of ``model``, written to ``output`` (``ray``: rows timed
    on Ray actors; ``repair``: with the rows of the fitted maps ``prune(repair=...)`` may put in removed blocks)."""
    return api.latency(model, output, latency_options(latency, backend, batch, rounds), input_shape, ray_options(ray),
                       RepairOptions() if repair is True else (repair or None))


def demo(out_dir: PathLike = "out/demo", **keywords: Any) -> DemoResult:
    """``onnxprune demo``: the whole pipeline on the shipped model (the keywords of onnxprune.api.demo)."""
    return api.demo(os.fspath(out_dir), **keywords)
