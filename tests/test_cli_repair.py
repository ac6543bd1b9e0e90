"""The repair verb and prune --repair, through the command line, on the shipped ResNet-20."""

import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.data.sources import load_data
from onnxprune.graph.io import load_model
from onnxprune.plan import load_plan
from onnxprune.repair.linear import reference_of, repair, with_placeholder_maps
from tests.conftest import run

MODEL, CALIB = "models/resnet20.onnx", "models/cifar10_calib512.npz"


def test_prune_with_repair_then_the_repair_verb_on_a_plain_prune(tmp_path, capsys):
    out = tmp_path / "repaired.onnx"
    assert main(["prune", MODEL, "--remove-blocks", "3", "--data", CALIB, "--samples", "128", "--repair", "linear",
                 "-o", str(out), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["repair"]["maps"]) == 3 and result["repaired_verification"]["passed"]
    assert result["repair_agreement"]["repaired"] > result["repair_agreement"]["pruned"]
    assert load_plan(tmp_path / "repaired.plan.json").repair["maps"] == result["repair"]["maps"]
    onnx.checker.check_model(str(out), full_check=True)

    plain = tmp_path / "plain.onnx"
    assert main(["prune", MODEL, "--remove-blocks", "3", "--data", CALIB, "--samples", "128", "-o", str(plain),
                 "--quiet"]) == 0
    capsys.readouterr()
    again = tmp_path / "again.onnx"
    assert main(["repair", str(plain), "--teacher", MODEL, "--data", CALIB, "--samples", "128", "--independent",
                 "-o", str(again)]) == 0
    text = capsys.readouterr().out
    assert "3 linear maps fitted on 128 samples (independently" in text and "wrote" in text
    plan = load_plan(tmp_path / "again.plan.json")
    assert plan.remove_blocks == load_plan(tmp_path / "plain.plan.json").remove_blocks and plan.repair["maps"]


@pytest.mark.parametrize("argv, message", [
    (["prune", MODEL, "--remove-blocks", "2", "--data", CALIB, "--repair-ridge", "0.1"], "need --repair linear"),
    (["prune", MODEL, "--remove-blocks", "2", "--repair", "linear"], "real calibration data"),
    (["repair", MODEL, "--teacher", MODEL, "--data", "random"], "real data"),
])
def test_repair_refuses_what_would_be_ignored_or_meaningless(tmp_path, capsys, argv, message):
    assert main(argv + ["-o", str(tmp_path / "out.onnx")]) == 2
    assert message in capsys.readouterr().err


def test_placeholder_maps_have_the_repaired_model_s_nodes(tmp_path):
    assert main(["prune", MODEL, "--remove-blocks", "2", "--data", CALIB, "--samples", "64", "-o",
                 str(tmp_path / "p.onnx"), "--quiet"]) == 0
    original, pruned = load_model(MODEL), load_model(tmp_path / "p.onnx")
    placeholder = with_placeholder_maps(pruned, reference_of(original))
    repaired = repair(pruned, original, load_data(CALIB, original, samples=64)).model
    assert [n.op_type for n in placeholder.graph.node] == [n.op_type for n in repaired.graph.node]
    assert len(placeholder.graph.node) == len(pruned.graph.node) + 2
    feeds = {"input": np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(run(placeholder, feeds)[0], run(pruned, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_speedup_search_with_repair_times_the_maps_and_reports_the_repaired_speedup(tmp_path, capsys):
    code = main(["prune", MODEL, "--speedup", "1.2", "--method", "slp", "--data", CALIB, "--samples", "64",
                 "--repair", "linear", "--latency-batch", "4", "--rounds", "3", "-o", str(tmp_path / "r.onnx"),
                 "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == (0 if result["target_met"] else 4)
    assert result["target_met"] == (result["measured_speedup"] >= 1.2)
    assert result["measured_speedup_in_search"] > 0 and result["repair"]["maps"]
    repaired = load_model(tmp_path / "r.onnx")
    assert sum(n.name.endswith("/repair") for n in repaired.graph.node) == sum(
        m["placed"].startswith("inserted") for m in result["repair"]["maps"])


@pytest.mark.parametrize("argv, expected", [
    (["repair", "p.onnx", "--teacher", "o.onnx", "-o", "r.onnx"], dict(ridge=1e-3, sequential=True, fold=True)),
    (["repair", "p.onnx", "--teacher", "o.onnx", "-o", "r.onnx", "--no-fold", "--independent", "--ridge", "0.1"],
     dict(ridge=0.1, sequential=False, fold=False)),
    (["prune", "m.onnx", "--remove-blocks", "1", "-o", "r.onnx", "--repair", "linear", "--repair-no-fold",
      "--repair-independent", "--repair-ridge", "0.2"], dict(ridge=0.2, sequential=False, fold=False)),
])
def test_repair_flags_reach_the_options(argv, expected):
    from onnxprune.cli import parse_args, repair_options

    options = repair_options(parse_args(argv))
    assert {k: getattr(options, k) for k in expected} == expected
