"""onnxprune: make exported ONNX networks shallower and faster, at the graph level. The Python API (docs/api.md):

>>> import onnxprune
>>> result = onnxprune.prune("models/resnet20.onnx", data="models/cifar10_calib512.npz", samples=64,
...                          remove_blocks=2, output="out/resnet20_pruned.onnx")
>>> result.removed_blocks, result.verification.passed, result.plan

Every verb of the command line is a function here (onnxprune.pipeline), taking the option objects of
onnxprune.options or keywords that build them, and returning a result object (onnxprune.results).
"""

from onnxprune.errors import MissingDependency, OnnxPruneError, UnavailableBackend, VerificationFailed

_FUNCTIONS = ("analyze", "apply", "evaluate_model", "score", "prune", "heal", "repair_model", "train_prune",
              "latency_table", "bench", "demo")
_OPTIONS = ("DataOptions", "TargetOptions", "OutputOptions", "LatencyOptions", "ScoringOptions", "HealingOptions",
            "RepairOptions", "GateTrainingOptions")
_RESULTS = ("ApplyResult", "EvalResult", "ScoreResult", "PruneResult", "HealResult", "RepairResult",
            "TrainPruneResult", "LatencyResult", "BenchResult", "DemoResult", "Agreement", "BlockScore")
__all__ = [*_FUNCTIONS, *_OPTIONS, *_RESULTS, "load_model", "save_model", "Structure", "OnnxPruneError",
           "VerificationFailed", "MissingDependency", "UnavailableBackend"]
__version__ = "0.1.0"
_LAZY = {**dict.fromkeys(_FUNCTIONS, "onnxprune.pipeline"), **dict.fromkeys(_OPTIONS, "onnxprune.options"),
         **dict.fromkeys(_RESULTS, "onnxprune.results"), "Structure": "onnxprune.graph.analysis",
         "load_model": "onnxprune.graph.io", "save_model": "onnxprune.graph.io"}


def __getattr__(name: str):
    """The public names, imported on first use, so that ``onnxprune --help`` loads neither onnx nor onnxruntime."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
