"""The train-prune verb through the command line, on the shipped ResNet-20 (docs/algorithms.md section 5)."""

import json
import sys

import onnx
import pytest

from onnxprune.cli import main
from onnxprune.plan import load_plan
from onnxprune.report.png import SIGNATURE

pytest.importorskip("torch")

MODEL, CALIB = "models/resnet20.onnx", "models/cifar10_calib512.npz"


def test_train_prune_writes_a_verified_model_plan_thetas_and_plot(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    # a small batch keeps it short; a large block cost makes some gates close within 20 steps
    assert main(["train-prune", MODEL, "--data", CALIB, "--samples", "64", "--steps", "20", "--train-batch", "16",
                 "--theta-lr", "0.2", "--patience", "2", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verification"]["passed"]
    onnx.checker.check_model(str(out), full_check=True)
    plan = load_plan(tmp_path / "r20.plan.json")
    assert plan.method == "train-prune" and plan.remove_blocks == result["removed_blocks"]
    assert plan.training["pruned_at"] == result["pruned_at"]
    assert len(plan.training["history"]) == 11 and all(len(e["theta"]) == 7 for e in plan.training["history"])
    assert len(onnx.load(str(out)).graph.node) < len(onnx.load(MODEL).graph.node) or not result["removed_blocks"]
    thetas = json.loads((tmp_path / "r20.thetas.json").read_text())
    assert len(thetas["blocks"]) == 7 and thetas["evaluations"][0]["step"] == 0 and thetas["trace"][-1][0] == 20
    assert (tmp_path / "r20.thetas.png").read_bytes().startswith(SIGNATURE)


def test_train_prune_without_torch_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "onnxprune.train.gates", raising=False)
    monkeypatch.delitem(sys.modules, "onnxprune.train.heal", raising=False)
    monkeypatch.delitem(sys.modules, "onnxprune.train.bridge", raising=False)
    assert main(["train-prune", MODEL, "--data", CALIB, "--steps", "1", "-o", str(tmp_path / "x.onnx")]) == 3
    assert "pip install 'onnxprune[torch]'" in capsys.readouterr().err
