import json
import subprocess
import sys

import onnx
import pytest

from onnxprune.cli import main
from tests.builders import GraphBuilder, residual_block


@pytest.fixture
def resnet_file(tmp_path):
    g = GraphBuilder(("batch", 3, 16, 16))
    x = g.relu(g.conv(g.input, 8))
    x = residual_block(g, residual_block(g, x), projection=True, stride=2, cout=16)
    path = tmp_path / "net.onnx"
    onnx.save(g.build([x]), path)
    return path


def test_analyze_json_has_the_documented_keys(resnet_file, capsys):
    assert main(["analyze", str(resnet_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    blocks = out["residual_blocks"]
    assert [(b["shortcut"], b["removable"]) for b in blocks] == [("identity", True), ("projection", False)]
    assert {"join", "shortcut", "removable", "params", "macs"} <= set(blocks[0])
    assert {"name", "kernel", "stride", "groups", "in_channels", "out_channels", "activation"} <= set(out["convs"][0])


def test_analyze_table_names_every_block(resnet_file, capsys):
    assert main(["analyze", str(resnet_file)]) == 0
    text = capsys.readouterr().out
    assert "2 residual blocks (1 removable)" in text and "projection" in text


def test_bad_inputs_give_one_line_and_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    no_compute = tmp_path / "relu.onnx"
    g = GraphBuilder()
    onnx.save(g.build([g.relu(g.input)]), no_compute)
    for path in (tmp_path / "missing.onnx", bad, no_compute):
        proc = subprocess.run([sys.executable, "-m", "onnxprune", "analyze", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2  # bad input
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), proc.stderr


def test_help_lists_the_verbs():
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "analyze" in proc.stdout


def test_apply_writes_a_verified_model_and_refuses_bad_plans(resnet_file, tmp_path, capsys):
    blocks = json.loads(subprocess.run([sys.executable, "-m", "onnxprune", "analyze", str(resnet_file), "--json"],
                                       capture_output=True, text=True, check=True).stdout)["residual_blocks"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"remove_blocks": [blocks[0]["join"]]}))
    out = tmp_path / "out.onnx"
    assert main(["apply", str(resnet_file), str(plan), "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verification"]["passed"] and result["plan"]["removed_blocks"] == [blocks[0]["join"]]
    assert result["verification"]["finite"] and not result["verification"]["identical"]  # a block fewer
    assert out.exists() and len(json.loads(subprocess.run(
        [sys.executable, "-m", "onnxprune", "analyze", str(out), "--json"], capture_output=True, text=True,
        check=True).stdout)["residual_blocks"]) == 1

    for bad in ({"remove_blocks": ["nope"]}, {"remove_blocks": [blocks[1]["join"]]}, {"merge": [["a", "b"]]},
                {"remove_block": []}):
        plan.write_text(json.dumps(bad))
        refused = tmp_path / "refused.onnx"
        assert main(["apply", str(resnet_file), str(plan), "-o", str(refused)]) == 2  # a refused plan
        assert not refused.exists()
        assert capsys.readouterr().err.startswith("onnxprune: error:")
    assert main(["apply", str(resnet_file), str(plan), "-o", str(resnet_file)]) == 2
    assert "never overwrites its input" in capsys.readouterr().err
