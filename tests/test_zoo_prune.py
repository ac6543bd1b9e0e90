"""Every real export prunes: the torchvision-style architectures of tests/zoo.py, exported by both torch
exporters with a dynamic or a fixed batch, and the opset-9 model-zoo classics that onnx ships, each run
through `prune --method layermerge --speedup 1.2` and `prune --method slp --remove-blocks 2` to a verified
model, or refused before any measurement with one line that names what it cannot handle.

The default run covers every architecture with SLP (TorchScript, dynamic batch) and, with LayerMerge (the
dynamo exporter with a fixed batch, the common TensorRT-pipeline export), the architectures whose graphs
made the whole search fail before: grouped convs read from outside a merge (RegNet), a Transpose in the chain
(ConvNeXt) and attention (ViT). A spread sample of MobileNetV2's LayerMerge options (depthwise and ReLU6) and
EfficientNet's block removals (through squeeze-excitation) are applied and verified in
tests/planning/test_candidates.py; their whole searches, the plain ResNets and MobileNetV3, the whole matrix and
the model-zoo classics run with ``-m slow``.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.graph.io import load_model
from onnxprune.runtime.session import create_session
from tests import zoo

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """exports(name, exporter, static) -> path, each exported once per module."""
    cache: dict[tuple, Path] = {}

    def get(name: str, exporter: str, static: bool) -> Path:
        key = (name, exporter, static)
        if key not in cache:
            path = tmp_path_factory.mktemp("zoo") / f"{name}_{exporter}_{'static' if static else 'dynamic'}.onnx"
            zoo.export(zoo.perturb(zoo.BUILDERS[name](**zoo.SMALL_KW[name])), path, exporter, zoo.INPUT_SIZE[name],
                       static_batch=1 if static else None)
            cache[key] = path
        return cache[key]

    return get


def prune_checks(model: Path, out: Path, method_flags: list[str], capsys) -> dict:
    """Run prune; a result must be a verified, finite model that runs, and a refusal one line naming why."""
    code = main(["prune", str(model), "--data", "random", "--samples", "8", "--batch", "8", "-o", str(out),
                 "--json", "--quiet"] + method_flags)
    captured = capsys.readouterr()
    if not captured.out.strip():  # refused: one line on stderr, nothing written
        lines = captured.err.strip().splitlines()
        lines = [line for line in lines if not line.startswith("warning:")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("onnxprune: error:"), captured.err
        assert not out.exists()
        return {"refused": lines[0]}
    result = json.loads(captured.out)
    assert code == (0 if result["target_met"] else 1), captured.err
    assert result["verification"]["passed"], result["verification"]
    pruned = load_model(out)
    onnx.checker.check_model(pruned, full_check=True)
    session = create_session(pruned, "cpu")
    shape = [d if isinstance(d, int) else 1 for d in pruned_input_shape(pruned)]
    outputs = session.run({session.input_names[0]: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    assert all(np.isfinite(o).all() for o in outputs)
    return result


def pruned_input_shape(model: onnx.ModelProto) -> list:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else "?" for d in dims]


def layermerge(model: Path, tmp_path: Path, capsys) -> dict:
    result = prune_checks(model, tmp_path / "layermerge.onnx", ["--speedup", "1.2", "--rounds", "5"], capsys)
    if "refused" not in result:
        assert result["measured_speedup"] > 0 and result["latency_batch"] == 1
    return result


def slp(model: Path, tmp_path: Path, capsys) -> dict:
    result = prune_checks(model, tmp_path / "slp.onnx", ["--remove-blocks", "2"], capsys)
    if "refused" not in result:
        assert len(result["removed_blocks"]) == 2
    return result


# LayerMerge's default run leaves them to -m slow: the plain ResNets and MobileNetV3 add no graph pattern; a spread
# sample of MobileNetV2's options (both exporters) and EfficientNet's block removals through squeeze-excitation are
# applied and verified in tests/planning/test_candidates.py, and SLP prunes both below
PLAIN = {"resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v2", "efficientnet_b0"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in PLAIN else n
                                  for n in sorted(zoo.BUILDERS)])
def test_layermerge_prunes_every_architecture_from_the_default_exporter(exports, name, tmp_path, capsys):
    result = layermerge(exports(name, "dynamo", static=True), tmp_path, capsys)
    assert "refused" not in result, result


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_slp_prunes_every_architecture(exported, name, tmp_path, capsys):
    result = slp(exported(name, "torchscript"), tmp_path, capsys)  # conftest's export: the same model, made once
    assert "refused" not in result, result


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_every_export_of_every_architecture_prunes(exports, name, exporter, static, tmp_path, capsys):
    for run in (layermerge, slp):
        result = run(exports(name, exporter, static), tmp_path, capsys)
        assert "refused" not in result, result


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_the_model_zoo_classics_prune_or_are_refused_with_a_reason(name, tmp_path, capsys):
    """Opset 9, upgraded on load. Models without residual blocks (VGG, AlexNet...) have nothing for SLP: they
    are refused with a line that says so; LayerMerge can still merge their convs."""
    path = LIGHT / f"light_{name}.onnx"
    merged = layermerge(path, tmp_path, capsys)
    removed = slp(path, tmp_path, capsys)
    for result in (merged, removed):
        if "refused" in result:
            assert any(word in result["refused"] for word in ("no removable block", "residual", "out of reach",
                                                             "no combination", "nothing")), result
