import os

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import settings

# CI is a landing gate: there the property tests draw the same examples on every run (derandomize), so a
# result is reproducible from the commit alone. Local runs keep drawing new examples to find new failures.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


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


@pytest.fixture(scope="session")
def exported_encoder(tmp_path_factory):
    """exported_encoder(exporter, token_types=False) -> (torch model, path of its ONNX export) of the small
    post-LN encoder of tests/encoder.py, exported once per session."""
    from tests import encoder

    cache: dict[tuple, tuple] = {}

    def get(exporter: str = "torchscript", token_types: bool = False):
        key = (exporter, token_types)
        if key not in cache:
            model = encoder.Encoder(token_types=token_types)
            path = tmp_path_factory.mktemp("encoder") / f"encoder_{exporter}{'_types' if token_types else ''}.onnx"
            cache[key] = model, encoder.export(model, path, exporter)
        return cache[key]

    return get
