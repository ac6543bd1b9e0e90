"""CKA between tensors of the original network and the same tensors in modified copies of it,
over a calibration set: the measurement behind both SLP's block scores and LayerMerge's row
importances (docs/algorithms.md sections 1, 2 and 4).

A modified copy is usually a *suffix* (runtime.capture.suffix_model): the part after the change,
fed with tensors captured from the original network, so the unchanged prefix never runs twice.
One pass over the data runs the original (capturing every tensor the copies read or are compared
with) and every copy on each batch. The copies' sessions stay alive for that pass; when their
weights together exceed ``memory_budget`` bytes, the copies are split into groups that take one
pass each (the original then runs once per group), so memory stays bounded on large models.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.io import weight_bytes
from onnxprune.runtime.capture import capture_batch, with_outputs
from onnxprune.runtime.session import create_session
from onnxprune.similarity.cka import accumulator

MEMORY_BUDGET = 2 << 30  # bytes of weights in the sessions alive at once


@dataclass
class Copy:
    """A modified network: fed ``feeds`` (its input name -> a tensor of the original, or a model
    input), its ``output`` compared with tensor ``reference`` of the original."""

    model: onnx.ModelProto
    feeds: dict[str, str]
    output: str
    reference: str


def groups_within(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most ``budget``
    (a single item over the budget gets a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= budget:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def cka_with_original(original: onnx.ModelProto, copies: list[Copy], data: Dataset, provider: str = "auto",
                      batch: int = 64, unbiased: bool = False,
                      memory_budget: int = MEMORY_BUDGET) -> tuple[list[float], str]:
    """(linear CKA of every copy's output with its reference tensor, the provider used)."""
    if not copies:
        return [], create_session(original, provider).provider
    inputs = set(data.inputs)
    values: list[float] = [0.0] * len(copies)
    used = provider
    for group in groups_within([weight_bytes(c.model) for c in copies], memory_budget):
        members = [copies[k] for k in group]
        captured = [name for c in members for name in (c.reference, *c.feeds.values()) if name not in inputs]
        full = create_session(with_outputs(original, captured), provider)
        used = full.provider
        # One session per copy, without onnxruntime's memory arena: each arena would keep its peak.
        sessions = [create_session(c.model, provider, arena=False) for c in members]
        accumulators: list = [None] * len(members)
        for feeds, _, count in data.batches(capture_batch(original, captured, batch)):
            outs = {**feeds, **dict(zip(full.output_names, full.run(feeds)))}
            for k, (c, session) in enumerate(zip(members, sessions)):
                reference = outs[c.reference][:count].reshape(count, -1)
                got = session.run({name: outs[source] for name, source in c.feeds.items()}, [c.output])[0][:count]
                if accumulators[k] is None:
                    accumulators[k] = accumulator(reference.shape[1], unbiased)
                accumulators[k].update(reference, got)
        if any(a is None for a in accumulators):
            raise OnnxPruneError("no calibration data to score with")
        for k, acc in zip(group, accumulators):
            values[k] = acc.value()
    return values, used
