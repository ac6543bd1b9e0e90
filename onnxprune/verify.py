"""Verification of a rewritten model against its original: ``onnx.checker`` with full shape
inference, an onnxruntime run of both, the same output names, shapes and dtypes, and the
numerical difference of the outputs (max abs, max relative, cosine similarity)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxprune.graph.io import over_protobuf_limit
from onnxprune.runtime.session import create_session

_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
             onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}


@dataclass
class OutputDiff:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine: float


@dataclass
class Verification:
    passed: bool
    checker: str
    interface: str
    provider: str | None
    inputs: str
    identical: bool = False
    outputs: list[OutputDiff] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        head = "PASSED" if self.passed else "FAILED"
        parts = [f"verification {head}: checker {self.checker}, interface {self.interface}, "
                 f"onnxruntime {self.provider or 'did not run'}, inputs {self.inputs}"]
        for o in self.outputs:
            parts.append(f"  output {o.name} {o.shape}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, cosine {o.cosine:.6f}")
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
           expect_identical: bool = False, provider: str = "cpu") -> Verification:
    """Check ``rewritten`` and compare it with ``original`` on ``feeds`` (random inputs when None)."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-verify-") as tmp:
        return _verify(_runnable(original, tmp, "original.onnx"), _runnable(rewritten, tmp, "rewritten.onnx"),
                       original, rewritten, feeds, expect_identical, provider)


def _runnable(model: onnx.ModelProto, folder: str, name: str) -> onnx.ModelProto | str:
    """The model itself, or for one over the protobuf limit, a path to it saved with external data."""
    if not over_protobuf_limit(model):
        return model
    path = os.path.join(folder, name)
    onnx.save_model(model, path, save_as_external_data=True, location=name + ".data")
    return path


def _verify(original_run, rewritten_run, original: onnx.ModelProto, rewritten: onnx.ModelProto,
            feeds: dict[str, np.ndarray] | None, expect_identical: bool, provider: str) -> Verification:
    try:
        onnx.checker.check_model(rewritten_run, full_check=True)
        checker = "ok"
    except Exception as exc:  # checker errors come in several types
        checker = f"failed: {str(exc).strip().splitlines()[0][:200]}"
    interface = "ok" if _interface(original) == _interface(rewritten) else (
        f"changed: {_interface(original)} -> {_interface(rewritten)}")
    inputs = "given" if feeds is not None else "random N(0,1), batch 2, seed 0"
    feeds = feeds if feeds is not None else random_feeds(original)
    result = Verification(passed=False, checker=checker, interface=interface, provider=None, inputs=inputs)
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
    for name, a, b in zip(session_a.output_names, outs_a, outs_b):
        if a.shape != b.shape:
            continue
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        diff = np.abs(a64 - b64)
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        result.outputs.append(OutputDiff(
            name=name, shape=list(a.shape), max_abs=float(diff.max(initial=0.0)),
            max_rel=float((diff / np.maximum(np.abs(a64), 1e-12)).max(initial=0.0)),
            cosine=float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64)),
        ))
    result.identical = same_outputs and all(np.array_equal(a, b) for a, b in zip(outs_a, outs_b))
    result.passed = checker == "ok" and result.interface == "ok" and (result.identical or not expect_identical)
    return result
