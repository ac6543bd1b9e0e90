"""What a pipeline relies on: one exit status per kind of failure (README, "exit status"), --debug anywhere, and
--json output that is one versioned JSON object on stdout, nothing else."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnxruntime as ort
import pytest

from onnxprune import api
from onnxprune.cli import (EXIT_MISSING_DEPENDENCY, EXIT_TARGET_MISSED, EXIT_USAGE, EXIT_VERIFICATION_FAILED,
                           JSON_SCHEMA_VERSION, build_parser, main)
from onnxprune.errors import MissingDependency, OnnxPruneError, UnavailableBackend, VerificationFailed
from tests.builders import GraphBuilder, residual_block

ROOT = Path(__file__).resolve().parents[1]
RESNET20, CALIB = ROOT / "models" / "resnet20.onnx", ROOT / "models" / "cifar10_calib512.npz"


@pytest.fixture
def net(tmp_path):
    g = GraphBuilder(("batch", 3, 16, 16))
    x = g.relu(g.conv(g.input, 8))
    x = residual_block(g, residual_block(g, x))
    path = tmp_path / "net.onnx"
    onnx.save(g.build([x]), path)
    return path


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), err
    return lines[0]


def test_the_statuses_are_the_documented_ones():
    assert (EXIT_VERIFICATION_FAILED, EXIT_USAGE, EXIT_MISSING_DEPENDENCY, EXIT_TARGET_MISSED) == (1, 2, 3, 4)
    assert OnnxPruneError("x").exit_status == 2 and VerificationFailed("x").exit_status == 1
    assert MissingDependency("x").exit_status == 3 and UnavailableBackend("x").exit_status == 3
    epilog = build_parser().epilog
    for line in ("  1  verification failed", "  2  bad usage or bad input", "  3  a missing optional dependency",
                 "  4  target missed"):
        assert line in epilog
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{code}`" in readme for code in range(5))


def plan_removing_the_first_block(net, tmp_path) -> Path:
    join = api.analyze(net).residual_blocks[0].join
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"remove_blocks": [join]}))
    return plan


def test_status_1_when_the_rewritten_model_fails_verification(net, tmp_path, capsys, monkeypatch):
    plan = plan_removing_the_first_block(net, tmp_path)

    class Failed:
        passed = False

        def summary(self):
            return "output logits: 3 non-finite values"

    monkeypatch.setattr(api, "verify", lambda *args, **kwargs: Failed())
    out = tmp_path / "out.onnx"
    assert main(["apply", str(net), str(plan), "-o", str(out)]) == EXIT_VERIFICATION_FAILED
    assert "failed verification" in one_error_line(capsys.readouterr().err) and not out.exists()


def test_status_2_for_bad_input_and_bad_usage(net, tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing.onnx")]) == EXIT_USAGE
    one_error_line(capsys.readouterr().err)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"remove_blocks": ["nope"]}))
    assert main(["apply", str(net), str(plan), "-o", str(tmp_path / "o.onnx")]) == EXIT_USAGE  # a refused plan
    one_error_line(capsys.readouterr().err)
    assert main(["prune", str(net), "--remove-blocks", "1", "--scope", "local", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "--scope does not apply" in one_error_line(capsys.readouterr().err)  # a bad flag combination
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors
        main(["prune", str(net), "-o", str(tmp_path / "o.onnx")])
    assert exit_info.value.code == EXIT_USAGE


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_status_3_for_a_backend_or_provider_that_cannot_run_here(net, capsys):
    assert main(["bench", str(net), "--backend", "ort-cuda", "--rounds", "1"]) == EXIT_MISSING_DEPENDENCY
    assert "CUDAExecutionProvider" in one_error_line(capsys.readouterr().err)
    assert main(["eval", str(net), "--data", "random", "--samples", "2", "--reference", str(net),
                 "--provider", "cuda"]) == EXIT_MISSING_DEPENDENCY
    assert "onnxruntime-gpu" in one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_status_3_without_tensorrt(net, capsys):
    assert main(["bench", str(net), "--backend", "tensorrt", "--rounds", "1"]) == EXIT_MISSING_DEPENDENCY
    assert "pip install 'onnxprune[tensorrt]'" in one_error_line(capsys.readouterr().err)


def test_status_3_for_heal_without_torch(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxprune.train.heal", None)  # as if torch were not installed
    code = main(["heal", str(RESNET20), "--teacher", str(RESNET20), "--data", str(CALIB), "--samples", "16",
                 "-o", str(tmp_path / "h.onnx")])
    assert code == EXIT_MISSING_DEPENDENCY
    assert "pip install 'onnxprune[torch]'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "h.onnx").exists()


def test_status_4_when_the_target_is_missed(net, tmp_path, capsys, monkeypatch):
    """(A real miss, --remove-blocks past what --min-blocks-per-stage allows: tests/test_cli_prune.py.)"""
    def missed(*args, **kwargs):  # what the CLI reads of a PruneResult: its record
        return SimpleNamespace(to_dict=lambda: {"plan": str(plan), "target_met": False, "verification_text": "",
                                                "message": "measured 1.10x misses the 1.5x target by 36.4%"})

    plan = tmp_path / "o.plan.json"
    plan.write_text("{}")
    monkeypatch.setattr(api, "prune", missed)
    assert main(["prune", str(net), "--speedup", "1.5", "-o", str(tmp_path / "o.onnx"), "--json"]) == EXIT_TARGET_MISSED
    captured = capsys.readouterr()
    assert json.loads(captured.out)["target_met"] is False and "36.4%" in one_error_line(captured.err)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere_shows_the_traceback_and_keeps_the_status(tmp_path, capsys, where):
    argv = ["analyze", str(tmp_path / "missing.onnx")]
    assert main(["--debug", *argv] if where == "before" else [*argv, "--debug"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1].startswith("onnxprune: error:")
    assert main(argv) == EXIT_USAGE
    one_error_line(capsys.readouterr().err)


def test_json_carries_its_schema_version_and_is_alone_on_stdout(net, capsys, monkeypatch):
    analyze = api.analyze

    def chatty(path):
        print("a library printing on stdout")
        return analyze(path)

    monkeypatch.setattr(api, "analyze", chatty)
    assert main(["analyze", str(net), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["schema_version"] == JSON_SCHEMA_VERSION == 1
    assert "a library printing on stdout" in captured.err
    assert main(["analyze", str(net)]) == 0  # the text report is left as it is
    assert "a library printing on stdout" in capsys.readouterr().out


def test_every_json_verb_prints_one_versioned_object_on_stdout(net, tmp_path):
    def run(*argv):
        proc = subprocess.run([sys.executable, "-m", "onnxprune", *argv, "--json"], capture_output=True, text=True,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)  # the whole of stdout is the one object
        assert result["schema_version"] == 1
        return result

    run("analyze", str(net))
    run("score", str(net), "--data", "random", "--samples", "8")
    pruned = tmp_path / "p.onnx"
    assert run("prune", str(net), "--data", "random", "--samples", "8", "--remove-blocks", "1", "-o", str(pruned))
    run("apply", str(net), str(plan_removing_the_first_block(net, tmp_path)), "-o", str(tmp_path / "a.onnx"))
    run("bench", str(net), str(pruned), "--rounds", "2")
