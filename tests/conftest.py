import numpy as np
import onnxruntime as ort
import pytest


def run(model_or_path, feeds: dict) -> list[np.ndarray]:
    """Run a ModelProto or a path with onnxruntime on the CPU."""
    source = model_or_path if isinstance(model_or_path, (str,)) else model_or_path.SerializeToString()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
