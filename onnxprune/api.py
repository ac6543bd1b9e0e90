"""The public API: one function per CLI verb, taking paths and options, returning plain data."""

from __future__ import annotations

import os

from onnxprune.graph.analysis import Structure, analyze_model
from onnxprune.graph.io import load_model


def analyze(model_path: str | os.PathLike[str]) -> Structure:
    """Residual blocks and the conv chain of the model at ``model_path`` (see onnxprune.graph.analysis)."""
    return analyze_model(load_model(model_path))


def apply(model_path: str | os.PathLike[str], plan_path: str | os.PathLike[str],
          out_path: str | os.PathLike[str]) -> dict:
    """Apply the plan at ``plan_path`` to the model, verify the result, write it to ``out_path``.

    Nothing is written when the plan is refused or the result fails verification.
    """
    from pathlib import Path

    from onnxprune.errors import OnnxPruneError
    from onnxprune.graph.io import save_model
    from onnxprune.plan import apply_plan, load_plan
    from onnxprune.verify import verify

    if Path(out_path).resolve() == Path(model_path).resolve():
        raise OnnxPruneError("the output path is the input model: onnxprune never overwrites its input")
    original = load_model(model_path)
    plan = load_plan(plan_path)
    rewritten, summary = apply_plan(original, plan)
    verification = verify(original, rewritten, expect_identical=plan.empty)
    if not verification.passed:
        raise OnnxPruneError(f"the rewritten model failed verification; nothing written. {verification.summary()}")
    save_model(rewritten, out_path)
    return {"output": str(out_path), "plan": summary, "verification": verification.to_dict(),
            "verification_text": verification.summary()}


def evaluate(model_path: str | os.PathLike[str], data: str | None = None, reference: str | None = None,
             samples: int | None = None, seed: int = 0, batch: int = 64, labels: str | None = None,
             preprocess: dict | None = None, provider: str = "auto") -> dict:
    """Top-1 accuracy on ``data`` (when it has labels) and agreement with ``reference``."""
    from onnxprune.errors import OnnxPruneError
    from onnxprune.evaluate import evaluate_logits, logits_of
    from onnxprune.runtime.session import create_session

    model = load_model(model_path)
    dataset = _dataset(model, data, samples, seed, preprocess, labels)
    if dataset.labels is None and reference is None:
        raise OnnxPruneError("nothing to evaluate: the data has no labels (give --labels) and no --reference was given")
    session = create_session(model, provider)
    logits = logits_of(session, dataset, batch)
    reference_logits = None
    if reference is not None:
        reference_logits = logits_of(create_session(load_model(reference), provider), dataset, batch)
    result = evaluate_logits(logits, dataset.labels, reference_logits)
    result.update(model=str(model_path), reference=reference, data=dataset.source, random_data=dataset.random,
                  provider=session.provider)
    return result


def _dataset(model, data, samples, seed, preprocess, labels=None):
    from onnxprune.data.preprocess import Preprocess, preprocess_of
    from onnxprune.data.sources import load_data

    prep = None
    if preprocess and any(v is not None for v in preprocess.values()):
        prep = (preprocess_of(model) or Preprocess()).with_overrides(**preprocess)
    return load_data(data, model, samples=samples, seed=seed, preprocess=prep, labels=labels)


def _feature(model, name: str | None) -> str:
    from onnxprune.errors import OnnxPruneError
    from onnxprune.runtime.capture import feature_tensor

    if name is None:
        try:
            return feature_tensor(model)
        except ValueError as exc:
            raise OnnxPruneError(str(exc)) from None
    known = {t for n in model.graph.node for t in n.output}
    if name not in known:
        raise OnnxPruneError(f"--feature-tensor {name!r} is not a tensor of the model")
    return name


def score(model_path: str | os.PathLike[str], data: str | None = None, feature_tensor: str | None = None,
          samples: int | None = None, seed: int = 0, batch: int = 64, preprocess: dict | None = None,
          provider: str = "auto") -> dict:
    """SLP score (1 - CKA at the feature tensor) of every removable block; lower = less important."""
    from onnxprune.importance.slp import removal_candidates, score_blocks

    model = load_model(model_path)
    dataset = _dataset(model, data, samples, seed, preprocess)
    feature = _feature(model, feature_tensor)
    structure = analyze_model(model)
    run = score_blocks(model, dataset, removal_candidates(structure, 0), feature, provider, batch)
    return {"model": str(model_path), "feature_tensor": feature, "data": dataset.source, "random_data": dataset.random,
            "samples": run.samples, "provider": run.provider, "seconds": run.seconds,
            "blocks": [vars(s) for s in run.scores]}


def prune(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str], method: str = "slp",
          data: str | None = None, remove_blocks: int | None = None, macs_reduction: float | None = None,
          min_blocks_per_stage: int = 1, one_shot: bool = False, feature_tensor: str | None = None,
          samples: int | None = None, seed: int = 0, batch: int = 64, preprocess: dict | None = None,
          provider: str = "auto", plan_path: str | os.PathLike[str] | None = None, progress=None) -> dict:
    """Prune, verify, and write the model and its plan (``<out>.plan.json`` unless ``plan_path``)."""
    from pathlib import Path

    from onnxprune.errors import OnnxPruneError
    from onnxprune.graph.io import save_model
    from onnxprune.importance.slp import prune_slp
    from onnxprune.plan import apply_plan, save_plan
    from onnxprune.verify import verify

    if method != "slp":
        raise OnnxPruneError(f"unknown method {method!r}; available: slp")
    if Path(out_path).resolve() == Path(model_path).resolve():
        raise OnnxPruneError("the output path is the input model: onnxprune never overwrites its input")
    model = load_model(model_path)
    dataset = _dataset(model, data, samples, seed, preprocess)
    if dataset.random and progress:
        progress("warning: no --data given: scoring on RANDOM inputs, which says little about real data")
    result = prune_slp(model, dataset, _feature(model, feature_tensor), remove_blocks=remove_blocks,
                       macs_reduction=macs_reduction, min_blocks_per_stage=min_blocks_per_stage,
                       one_shot=one_shot, provider=provider, batch=batch, progress=progress)
    pruned, _ = apply_plan(model, result.plan)
    feeds = next(dataset.batches(min(batch, 16)))[0]
    verification = verify(model, pruned, feeds=feeds)
    if not verification.passed:
        raise OnnxPruneError(f"the pruned model failed verification; nothing written. {verification.summary()}")
    plan_path = Path(plan_path) if plan_path else Path(out_path).with_suffix(".plan.json")
    save_model(pruned, out_path)
    save_plan(result.plan, plan_path)
    predicted = result.plan.predicted
    return {"output": str(out_path), "plan": str(plan_path), "method": result.plan.method,
            "removed_blocks": result.plan.remove_blocks, "macs_before": predicted["macs_before"],
            "macs_after": predicted["macs_after"], "macs_reduction": 1 - predicted["macs_after"] / predicted["macs_before"],
            "target_met": result.target_met, "message": result.message, "provider": result.provider,
            "data": dataset.source, "random_data": dataset.random, "history": result.history,
            "verification": verification.to_dict(), "verification_text": verification.summary()}
