"""Verification of a rewritten model against its original: ``onnx.checker`` with full shape
inference, an onnxruntime run of both, the same output names, shapes and dtypes, finite outputs,
and the numerical difference of the outputs (max abs, max relative, cosine similarity, the
difference scaled by the original's largest |value|, top-1 agreement of a classifier output).

Every output of the rewritten model must be finite (no NaN, no Inf); when the original's outputs
are not finite either on the same inputs, the summary says so (the inputs are bad, not the
rewrite), and verification still fails.

A rewrite that preserves the function (``onnxprune.plan.preserves_function``: an empty plan, or
merges of linear runs with unpadded convs after the first) must match the original within
``TOLERANCE``, a share of the original output's largest |value|. BN folding and such merges are
exact in real arithmetic, not in float32: a folded weight rounds differently from the product it
replaces, a merged kernel sums in another order, and the rounding compounds with depth. So bit
identity is too strict and an elementwise relative bound fails wherever an output is near zero;
scaled by the largest |value|, the error is measured against the size of what the model computes.
The bound lies far above the rounding that BN folding and function-preserving merges show on the
shipped models, and at or below the difference that scaling one conv's weights by 1.001 makes
(benchmarks/bench_verify_tolerance.py; the figures are in benchmarks/RESULTS.md): a lost bias,
a wrong weight or a border band lies above it.

A rewrite that changes the function (blocks removed, activations dropped, padded convs merged)
passes on finite outputs and reports how far it drifted: the figures above and, for a first
output shaped (N, classes), the share of the batch whose top-1 class is unchanged.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import onnx

from onnxprune.graph.io import over_protobuf_limit
from onnxprune.runtime.session import create_session

_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
             onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}

# A function-preserving rewrite may differ from the original by at most this share of the original
# output's largest |value| (OutputDiff.scaled); the module docstring says why.
TOLERANCE = 1e-4


@dataclass
class OutputDiff:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # elementwise |a - b| / |a|: large wherever the original is near zero
    cosine: float
    scaled: float = 0.0  # max |a - b| / max |a|: what TOLERANCE bounds
    nonfinite: int = 0  # NaN and Inf values in the rewritten model's output
    original_nonfinite: int = 0  # and in the original's, on the same inputs
    within_tolerance: bool | None = None  # judged only for function-preserving rewrites
    top1_agreement: float | None = None  # share of the batch whose argmax agrees (first output, 2-D only)

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def line(self, tolerance: float | None) -> str:
        """One line: finiteness, the differences and, when judged, the tolerance."""
        size = int(np.prod(self.shape)) if self.shape else 1
        if self.finite:
            state = "finite"
        else:
            state = f"{self.nonfinite} of {size} values NaN/Inf"
            if self.original_nonfinite:
                state += (f" (the original's output has {self.original_nonfinite} too: the inputs are bad, "
                          "not the rewrite)")
        judged = ""
        if tolerance is not None and self.within_tolerance is not None:
            judged = f", {'within' if self.within_tolerance else 'OUTSIDE'} tolerance {tolerance:.0e}"
        text = (f"  output {self.name} {self.shape}: {state}, max abs {self.max_abs:.3g} ({self.scaled:.3g} of max "
                f"|output|{judged}), max rel {self.max_rel:.3g}, cosine {self.cosine:.6f}")
        if self.top1_agreement is not None:
            text += f", top-1 agreement {100 * self.top1_agreement:.1f}%"
        return text


@dataclass
class Verification:
    passed: bool
    checker: str
    interface: str
    provider: str | None
    inputs: str
    identical: bool = False
    preserves_function: bool = False
    tolerance: float | None = None  # the bound applied: TOLERANCE when the function is preserved, else None
    finite: bool = False  # every output of the rewritten model is free of NaN and Inf
    within_tolerance: bool | None = None  # every output within ``tolerance``; None when not judged
    agreement: float | None = None  # top-1 agreement of the first output, when it is (N, classes)
    outputs: list[OutputDiff] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry, diff in zip(data["outputs"], self.outputs):
            entry["finite"] = diff.finite
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Verification:
        """The inverse of ``to_dict`` (the result objects of onnxprune.results read their records with it)."""
        names = {f.name for f in fields(OutputDiff)}
        outputs = [OutputDiff(**{k: v for k, v in o.items() if k in names}) for o in data.get("outputs", [])]
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)} - {"outputs"}},
                   outputs=outputs)

    def summary(self) -> str:
        head = "PASSED" if self.passed else "FAILED"
        claim = (f"function preserved: within {self.tolerance:.0e} of max |output|" if self.preserves_function
                 else "function may change: finite outputs required")
        parts = [f"verification {head} ({claim}): checker {self.checker}, interface {self.interface}, "
                 f"onnxruntime {self.provider or 'did not run'}, inputs {self.inputs}"]
        parts.extend(o.line(self.tolerance) for o in self.outputs)
        if self.identical:
            parts.append("  outputs are bit-identical to the original's")
        return "\n".join(parts)


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs drawn from N(0, 1) (integers from 0..9) shaped like the model's inputs, symbolic dims = ``batch``."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        dtype = _NP_TYPES.get(t.elem_type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def _interface(model: onnx.ModelProto) -> list[tuple]:
    def describe(vi):
        t = vi.type.tensor_type
        return (vi.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim])
    return [describe(vi) for vi in model.graph.output]


def verify(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
           preserves_function: bool = False, provider: str = "cpu") -> Verification:
    """Check ``rewritten`` and compare it with ``original`` on ``feeds`` (random inputs when None).

    It passes when the checker and the interface are fine, onnxruntime runs both, every output of
    ``rewritten`` is finite and, with ``preserves_function``, every output is within TOLERANCE."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-verify-") as tmp:
        return _verify(_runnable(original, tmp, "original.onnx"), _runnable(rewritten, tmp, "rewritten.onnx"),
                       original, rewritten, feeds, preserves_function, provider)


def _runnable(model: onnx.ModelProto, folder: str, name: str) -> onnx.ModelProto | str:
    """The model itself, or for one over the protobuf limit, a path to it saved with external data."""
    if not over_protobuf_limit(model):
        return model
    path = os.path.join(folder, name)
    onnx.save_model(model, path, save_as_external_data=True, location=name + ".data")
    return path


def _verify(original_run, rewritten_run, original: onnx.ModelProto, rewritten: onnx.ModelProto,
            feeds: dict[str, np.ndarray] | None, preserves_function: bool, provider: str) -> Verification:
    try:
        onnx.checker.check_model(rewritten_run, full_check=True)
        checker = "ok"
    except Exception as exc:  # checker errors come in several types
        checker = f"failed: {str(exc).strip().splitlines()[0][:200]}"
    interface = "ok" if _interface(original) == _interface(rewritten) else (
        f"changed: {_interface(original)} -> {_interface(rewritten)}")
    inputs = "given" if feeds is not None else "random N(0,1), batch 2, seed 0"
    feeds = feeds if feeds is not None else random_feeds(original)
    tolerance = TOLERANCE if preserves_function else None
    result = Verification(passed=False, checker=checker, interface=interface, provider=None, inputs=inputs,
                          preserves_function=preserves_function, tolerance=tolerance)
    try:
        session_a, session_b = create_session(original_run, provider), create_session(rewritten_run, provider)
        result.provider = session_b.provider
        outs_a, outs_b = session_a.run(feeds), session_b.run(feeds)
    except Exception as exc:  # onnxruntime's errors are not one type either
        result.interface = f"{interface}; onnxruntime failed: {str(exc).strip().splitlines()[0][:200]}"
        return result
    same_outputs = all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(outs_a, outs_b))
    if not same_outputs:
        result.interface = "output shapes or dtypes changed"
    pairs = enumerate(zip(session_a.output_names, outs_a, outs_b))
    result.outputs = [compare_output(name, a, b, tolerance, first=i == 0)
                      for i, (name, a, b) in pairs if a.shape == b.shape]
    result.finite = same_outputs and all(o.finite for o in result.outputs)
    if tolerance is not None:
        result.within_tolerance = same_outputs and all(o.within_tolerance for o in result.outputs)
    result.agreement = result.outputs[0].top1_agreement if result.outputs else None
    result.identical = same_outputs and all(np.array_equal(a, b) for a, b in zip(outs_a, outs_b))
    result.passed = (checker == "ok" and result.interface == "ok" and result.finite
                     and result.within_tolerance is not False)
    return result


def compare_output(name: str, a: np.ndarray, b: np.ndarray, tolerance: float | None = None,
                   first: bool = False) -> OutputDiff:
    """How output ``b`` of the rewritten model differs from ``a`` of the original (same shape).
    ``tolerance`` judges ``scaled``; ``first`` asks for top-1 agreement when the output is (N, classes)."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    with np.errstate(all="ignore"):  # NaN and Inf are counted, not warned about
        diff = np.abs(a64 - b64)
        max_abs = float(diff.max(initial=0.0))
        scaled = _scaled(max_abs, float(np.abs(a64).max(initial=0.0)))
        out = OutputDiff(
            name=name, shape=list(a.shape), max_abs=max_abs,
            max_rel=float((diff / np.maximum(np.abs(a64), 1e-12)).max(initial=0.0)),
            cosine=_cosine(a64, b64),
            scaled=scaled, nonfinite=int((~np.isfinite(b64)).sum()), original_nonfinite=int((~np.isfinite(a64)).sum()),
        )
    if tolerance is not None:
        out.within_tolerance = out.finite and scaled <= tolerance
    if first and a.ndim == 2 and a.shape[0] > 0 and a.shape[1] > 1:
        out.top1_agreement = top1_agreement(a, b)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flat outputs (NaN when either is not finite, 1 for two all-zero ones)."""
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if not np.isfinite(denom):
        return float("nan")
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def _scaled(max_abs: float, largest: float) -> float:
    """``max_abs`` as a share of the original's largest |value| (0 for two all-zero outputs, inf if only it is)."""
    if largest > 0 and np.isfinite(largest):
        return max_abs / largest
    return 0.0 if max_abs == 0 else float("inf")


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The share of rows of two (N, classes) outputs whose argmax is the same."""
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
