"""onnxprune: make exported ONNX networks shallower and faster, at the graph level.

>>> import onnxprune
>>> structure = onnxprune.analyze("models/resnet56.onnx")
>>> [b.join for b in structure.residual_blocks if b.removable][:2]
"""

from onnxprune.api import analyze
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import Structure
from onnxprune.graph.io import load_model, save_model

__all__ = ["analyze", "load_model", "save_model", "OnnxPruneError", "Structure"]
__version__ = "0.1.0"
