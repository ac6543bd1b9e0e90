import onnx
import pytest

from onnxprune.graph.analysis import analyze_model
from onnxprune.plan import Plan, apply_plan
from tests.importance.test_slp import classifier


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(original path, pruned path, removed joins) of the small test classifier with one block removed."""
    folder = tmp_path_factory.mktemp("report")
    model = classifier(seed=3)
    removed = [analyze_model(model).residual_blocks[2].join]
    onnx.save(model, folder / "net.onnx")
    onnx.save(apply_plan(model, Plan(remove_blocks=removed))[0], folder / "pruned.onnx")
    return folder / "net.onnx", folder / "pruned.onnx", removed
