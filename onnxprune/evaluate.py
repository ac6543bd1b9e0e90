"""Top-1 accuracy, and agreement with a reference model (top-1 match and mean KL divergence),
computed with onnxruntime over a data set. The model's first output is taken as the logits."""

from __future__ import annotations

import numpy as np

from onnxprune import progress
from onnxprune.data.sources import Dataset
from onnxprune.runtime.session import Session


def logits_of(session: Session, data: Dataset, batch: int) -> np.ndarray:
    outputs = [session.run(feeds)[0][:count] for feeds, _, count in progress.batches(data, batch, "evaluating")]
    return np.concatenate(outputs).reshape(len(data), -1).astype(np.float64)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def evaluate_logits(logits: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None) -> dict:
    """accuracy (when labels), agreement and mean KL(reference || model) (when a reference)."""
    result: dict = {"samples": int(len(logits))}
    predicted = logits.argmax(axis=1)
    if labels is not None:
        result["accuracy"] = float((predicted == labels).mean())
    if reference is not None:
        result["agreement"] = float((predicted == reference.argmax(axis=1)).mean())
        log_p, log_q = log_softmax(reference), log_softmax(logits)
        result["mean_kl"] = float((np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean())
        if labels is not None:
            result["reference_accuracy"] = float((reference.argmax(axis=1) == labels).mean())
    return result
