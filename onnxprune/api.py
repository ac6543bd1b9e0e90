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
    from onnxprune.data.preprocess import preprocess_of, Preprocess
    from onnxprune.data.sources import load_data
    from onnxprune.errors import OnnxPruneError
    from onnxprune.evaluate import evaluate_logits, logits_of
    from onnxprune.runtime.session import create_session

    model = load_model(model_path)
    prep = None
    if preprocess and any(v is not None for v in preprocess.values()):
        prep = (preprocess_of(model) or Preprocess()).with_overrides(**preprocess)
    dataset = load_data(data, model, samples=samples, seed=seed, preprocess=prep, labels=labels)
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
