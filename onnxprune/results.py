"""What the API's functions return (docs/api.md, "Results"): one frozen dataclass per verb, with the values a
pipeline checks as typed attributes, read from the verb's record (``from_dict``), and ``to_dict()``, that record
itself: what ``onnxprune VERB --json`` prints, less ``schema_version`` and less ``verification_text`` (the
verification as the text report writes it; the CLI drops it from JSON output).

Attributes never disagree with ``to_dict()``: they are read from the record, never kept beside it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxprune.verify import Verification


@dataclass(frozen=True)
class Agreement:
    """How a model compares with the original on held-back samples: top-1 agreement, mean KL(original || model),
    and top-1 accuracy when the data has labels."""

    agreement: float
    mean_kl: float | None = None
    accuracy: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Agreement:
        return cls(data["agreement"], data.get("mean_kl"), data.get("accuracy"))


@dataclass(frozen=True)
class Result:
    """The verb's whole record (``to_dict()``); subclasses add the typed attributes."""

    record: dict = field(repr=False, compare=False, kw_only=True)

    def to_dict(self) -> dict:
        """A copy of the record the CLI prints (``--json``) or formats (text and HTML reports)."""
        return copy.deepcopy(self.record)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _agreement(value: Mapping[str, Any] | None) -> Agreement | None:
    return None if value is None else Agreement.from_dict(value)


def _verification(value: Mapping[str, Any] | None) -> Verification | None:
    return None if value is None else Verification.from_dict(dict(value))


@dataclass(frozen=True)
class ApplyResult(Result):
    """``apply``: a plan applied to a model, verified, written."""

    output: Path
    removed_blocks: tuple[str, ...]
    changes_function: bool
    verification: Verification

    @classmethod
    def from_dict(cls, record: dict) -> ApplyResult:
        summary = record["plan"]
        return cls(Path(record["output"]), tuple(summary.get("removed_blocks", ())),
                   bool(summary.get("changes_function")), Verification.from_dict(record["verification"]),
                   record=record)


@dataclass(frozen=True)
class EvalResult(Result):
    """``eval``: top-1 accuracy (labelled data) and agreement with a reference model."""

    model: str
    data: str
    samples: int
    provider: str
    accuracy: float | None = None
    agreement: float | None = None
    mean_kl: float | None = None
    reference: str | None = None
    reference_accuracy: float | None = None

    @classmethod
    def from_dict(cls, record: dict) -> EvalResult:
        return cls(record["model"], record["data"], record["samples"], record["provider"], record.get("accuracy"),
                   record.get("agreement"), record.get("mean_kl"), record.get("reference"),
                   record.get("reference_accuracy"), record=record)


@dataclass(frozen=True)
class BlockScore:
    """One removable residual block's SLP score: 1 - CKA of the features without it (lower = less important)."""

    join: str
    score: float
    macs: int
    params: int


@dataclass(frozen=True)
class ScoreResult(Result):
    """``score``: the SLP score of every removable block, in graph order."""

    model: str
    feature_tensor: str
    data: str
    samples: int
    provider: str
    seconds: float
    blocks: tuple[BlockScore, ...]

    @property
    def ranking(self) -> list[str]:
        """The blocks' join names, least important first."""
        return [b.join for b in sorted(self.blocks, key=lambda b: b.score)]

    @classmethod
    def from_dict(cls, record: dict) -> ScoreResult:
        blocks = tuple(BlockScore(b["join"], b["score"], b["macs"], b["params"]) for b in record["blocks"])
        return cls(record["model"], record["feature_tensor"], record["data"], record["samples"], record["provider"],
                   record["seconds"], blocks, record=record)


@dataclass(frozen=True)
class PruneResult(Result):
    """``prune``: the pruned (repaired, healed) model and its plan, written and verified. The speed-up fields are
    set for a ``speedup`` target, the ``*_pruning``/``after_healing`` ones when the model was healed, the
    ``repair_*`` ones when it was repaired."""

    output: Path
    plan: Path
    method: str
    target_met: bool
    message: str  # why the target was missed ("" when met)
    removed_blocks: tuple[str, ...]
    macs_before: int
    macs_after: int
    macs_reduction: float
    data: str
    provider: str
    verification: Verification  # the pruned model against the original
    target_speedup: float | None = None
    measured_speedup: float | None = None  # original / pruned latency, side by side on the backend
    predicted_speedup: float | None = None  # layermerge: what the latency table predicted for the chosen plan
    original_latency_s: float | None = None
    pruned_latency_s: float | None = None
    latency_batch: int | None = None
    repair_agreement: Mapping[str, float] | None = None  # {"pruned": ..., "repaired": ...} on the calibration data
    before_pruning: Agreement | None = None
    after_pruning: Agreement | None = None
    after_healing: Agreement | None = None
    healed_verification: Verification | None = None

    @classmethod
    def from_dict(cls, record: dict) -> PruneResult:
        return cls(Path(record["output"]), Path(record["plan"]), record["method"], record["target_met"],
                   record["message"], tuple(record["removed_blocks"]), record["macs_before"], record["macs_after"],
                   record["macs_reduction"], record["data"], record["provider"],
                   Verification.from_dict(record["verification"]), record.get("target_speedup"),
                   record.get("measured_speedup"), predicted_speedup(record), record.get("original_latency_s"),
                   record.get("pruned_latency_s"), record.get("latency_batch"), record.get("repair_agreement"),
                   _agreement(record.get("before_pruning")), _agreement(record.get("after_pruning")),
                   _agreement(record.get("after_healing")), _verification(record.get("healed_verification")),
                   record=record)


def predicted_speedup(record: Mapping[str, Any]) -> float | None:
    """The speed-up the latency table predicted for the plan a speed-up search kept (LayerMerge's attempts)."""
    kept = record.get("predicted_latency_s")
    return next((a["predicted_speedup"] for a in record.get("attempts", [])
                 if kept is not None and a.get("predicted_s") == kept and "predicted_speedup" in a), None)


@dataclass(frozen=True)
class HealResult(Result):
    """``heal``: the healed model and its plan, with agreement on the held-back samples at each stage."""

    output: Path
    plan: Path
    teacher: str
    data: str
    before_pruning: Agreement
    after_pruning: Agreement
    after_healing: Agreement
    held_back_samples: int
    target_met: bool
    message: str
    verification: Verification

    @classmethod
    def from_dict(cls, record: dict) -> HealResult:
        return cls(Path(record["output"]), Path(record["plan"]), record["teacher"], record["data"],
                   Agreement.from_dict(record["before_pruning"]), Agreement.from_dict(record["after_pruning"]),
                   Agreement.from_dict(record["after_healing"]), record["held_back_samples"], record["target_met"],
                   record["message"], Verification.from_dict(record["verification"]), record=record)


@dataclass(frozen=True)
class RepairResult(Result):
    """``repair``: the repaired model and its plan; agreement with the original on the data the maps were fitted
    on (an optimistic figure)."""

    output: Path
    plan: Path
    teacher: str
    data: str
    maps: int  # affine maps fitted (folded or inserted)
    agreement_pruned: float | None
    agreement_repaired: float | None
    verification: Verification

    @classmethod
    def from_dict(cls, record: dict) -> RepairResult:
        agreement = record["agreement"]
        return cls(Path(record["output"]), Path(record["plan"]), record["teacher"], record["data"],
                   len(record["repair"].get("maps", [])), agreement.get("pruned"), agreement.get("repaired"),
                   Verification.from_dict(record["verification"]), record=record)


@dataclass(frozen=True)
class TrainPruneResult(Result):
    """``train-prune``: the trained and pruned model, its plan, the thetas (JSON) and their plot (PNG)."""

    output: Path
    plan: Path
    thetas: Path
    plot: Path | None
    removed_blocks: tuple[str, ...]
    macs_before: int
    macs_after: int
    macs_reduction: float
    target_met: bool
    message: str
    held_back_original: Agreement
    held_back_pruned: Agreement
    verification: Verification
    target_speedup: float | None = None
    measured_speedup: float | None = None

    @classmethod
    def from_dict(cls, record: dict) -> TrainPruneResult:
        return cls(Path(record["output"]), Path(record["plan"]), Path(record["thetas"]), _path(record.get("plot")),
                   tuple(record["removed_blocks"]), record["macs_before"], record["macs_after"],
                   record["macs_reduction"], record["target_met"], record["message"],
                   Agreement.from_dict(record["held_back_original"]), Agreement.from_dict(record["held_back_pruned"]),
                   Verification.from_dict(record["verification"]), record.get("target_speedup"),
                   record.get("measured_speedup"), record=record)


@dataclass(frozen=True)
class LatencyResult(Result):
    """``latency``: a LayerMerge latency table, written."""

    output: Path
    rows: int
    options: int
    whole_s: float  # the whole model's latency in the table's units
    backend: str
    device: str
    batch: int
    rounds: int

    @classmethod
    def from_dict(cls, record: dict) -> LatencyResult:
        return cls(Path(record["output"]), record["rows"], record["options"], record["whole_s"], record["backend"],
                   record["device"], record["batch"], record["rounds"], record=record)


@dataclass(frozen=True)
class BenchResult(Result):
    """``bench``: median latency of one model, or of two side by side with the second's speed-up."""

    backend: str
    device: str
    batch: int
    rounds: int
    models: tuple[str, ...]
    latencies_s: tuple[float, ...]  # per model, in the order given
    speedup: float | None = None  # the second model's, the median of the per-round ratios

    @classmethod
    def from_dict(cls, record: dict) -> BenchResult:
        backend = record["backend"]
        return cls(backend["backend"], backend.get("device", ""), record["batch"], record["rounds"],
                   tuple(m["model"] for m in record["models"]), tuple(m["latency_s"] for m in record["models"]),
                   record.get("speedup"), record=record)


@dataclass(frozen=True)
class DemoResult(Result):
    """``demo``: the whole pipeline on the shipped model; top-1 accuracy and agreement on the test data of every
    stage (None for a stage that was skipped)."""

    model: str
    test_data: str
    pruned: PruneResult  # the written model: repaired unless repair was skipped
    healed: HealResult | None
    pruned_model: Path  # the plan applied alone, without repair maps
    accuracy_before: float
    accuracy_after: float
    agreement: float
    accuracy_repaired: float | None = None
    agreement_repaired: float | None = None
    accuracy_healed: float | None = None
    agreement_healed: float | None = None

    @classmethod
    def from_dict(cls, record: dict) -> DemoResult:
        healed = record.get("healed")
        return cls(record["model"], record["test_data"], PruneResult.from_dict(record["pruned"]),
                   None if healed is None else HealResult.from_dict(healed), Path(record["pruned_model"]),
                   record["accuracy_before"], record["accuracy_after"], record["agreement"],
                   record.get("accuracy_repaired"), record.get("agreement_repaired"), record.get("accuracy_healed"),
                   record.get("agreement_healed"), record=record)
