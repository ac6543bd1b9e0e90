"""onnxprune: make exported ONNX networks shallower and faster, at the graph level.

>>> import onnxprune
>>> structure = onnxprune.analyze("models/resnet56.onnx")
>>> [b.join for b in structure.residual_blocks if b.removable][:2]
"""

from onnxprune.errors import OnnxPruneError

__all__ = ["analyze", "load_model", "save_model", "OnnxPruneError", "Structure"]
__version__ = "0.1.0"
_LAZY = {"analyze": "onnxprune.api", "Structure": "onnxprune.graph.analysis", "load_model": "onnxprune.graph.io",
         "save_model": "onnxprune.graph.io"}


def __getattr__(name: str):
    """The public names, imported on first use, so that ``onnxprune --help`` loads neither onnx nor onnxruntime."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
