"""Turning uint8 images into model inputs: the ``onnxprune.preprocess`` metadata of a model, or flags.

The metadata is JSON: ``{"input": name, "layout": "NCHW"|"NHWC", "size": [h, w], "scale": s,
"mean": [...], "std": [...]}``; the input is ``(image * scale - mean) / std`` per channel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnxprune.errors import OnnxPruneError

METADATA_KEY = "onnxprune.preprocess"
LABELS_KEY = "onnxprune.labels"


@dataclass(frozen=True)
class Preprocess:
    input: str | None = None
    layout: str = "NCHW"
    size: tuple[int, int] | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def apply(self, images_nhwc: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> float32 in ``layout``."""
        x = images_nhwc.astype(np.float32) * np.float32(self.scale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "NCHW" else x)

    def with_overrides(self, **overrides) -> Preprocess:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def preprocess_of(model: onnx.ModelProto) -> Preprocess | None:
    """The model's ``onnxprune.preprocess`` metadata, or None when it has none."""
    raw = metadata(model).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        spec = json.loads(raw)
        return Preprocess(
            input=spec.get("input"), layout=spec.get("layout", "NCHW").upper(),
            size=tuple(spec["size"]) if spec.get("size") else None, scale=float(spec.get("scale", 1 / 255)),
            mean=tuple(float(v) for v in spec.get("mean", (0.0, 0.0, 0.0))),
            std=tuple(float(v) for v in spec.get("std", (1.0, 1.0, 1.0))),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise OnnxPruneError(f"the model's {METADATA_KEY} metadata is not valid: {exc}") from None


def class_names(model: onnx.ModelProto) -> list[str] | None:
    raw = metadata(model).get(LABELS_KEY)
    try:
        return list(json.loads(raw)) if raw else None
    except ValueError:
        raise OnnxPruneError(f"the model's {LABELS_KEY} metadata is not a JSON list") from None
