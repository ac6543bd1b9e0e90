"""The public API: one function per CLI verb, taking paths and options, returning plain data."""

from __future__ import annotations

import os

from onnxprune.graph.analysis import Structure, analyze_model
from onnxprune.graph.io import load_model


def analyze(model_path: str | os.PathLike[str]) -> Structure:
    """Residual blocks and the conv chain of the model at ``model_path`` (see onnxprune.graph.analysis)."""
    return analyze_model(load_model(model_path))
