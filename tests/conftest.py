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


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, exporter, small=True) -> path of a tests/zoo.py model exported once per session."""
    from tests import zoo

    cache: dict[tuple, object] = {}

    def get(name: str, exporter: str, small: bool = True):
        key = (name, exporter, small)
        if key not in cache:
            kwargs = zoo.SMALL_KW[name] if small else {}
            size = zoo.INPUT_SIZE[name] if small else 224
            path = tmp_path_factory.mktemp("zoo") / f"{name}_{exporter}.onnx"
            zoo.export(zoo.perturb(zoo.BUILDERS[name](**kwargs)), path, exporter, size)
            cache[key] = path
        return cache[key]

    return get
