"""Ctrl-C (SIGINT) during ``prune`` and ``heal``: exit status 130, one line on stderr and no traceback, nothing
left in the output folder (no model, no plan, no temporary file), the inputs byte for byte as they were
(onnxprune.outputs, onnxprune.cli.main).

Each test starts ``python -m onnxprune`` and sends the signal once the run has logged that it is computing; a run
that ends before the signal arrives is started again with a larger workload rather than failed."""

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxprune.cli import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]
RESNET20, CALIB = ROOT / "models" / "resnet20.onnx", ROOT / "models" / "cifar10_calib512.npz"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _default_sigint() -> None:
    """In the child before it starts: SIGINT's default action. A test run started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(args: list[str], ready: str) -> tuple[int, str] | None:
    """(exit status, stderr) of ``onnxprune ARGS`` sent SIGINT right after it logs a line containing ``ready``;
    None when it ended before that."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=_default_sigint)
    seen = []
    for line in proc.stderr:  # stderr is line-buffered: each log line arrives as it is written
        seen.append(line)
        if ready in line:
            break
    if proc.poll() is not None or not seen or ready not in seen[-1]:
        proc.communicate()
        return None
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate()[1]
    if proc.returncode == 0:  # it finished before the signal reached Python
        return None
    return proc.returncode, "".join(seen) + rest


def calibration(folder: Path, copies: int) -> Path:
    """The shipped calibration images repeated ``copies`` times (a larger workload)."""
    data = np.load(CALIB)
    path = folder / f"calib{copies}.npz"
    np.savez(path, x=np.concatenate([data["x"]] * copies), y=np.concatenate([data["y"]] * copies))
    return path


def check(status_and_err: tuple[int, str], out: Path, inputs: dict[Path, str]) -> None:
    status, err = status_and_err
    assert status == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "onnxprune: error: interrupted; the outputs of this run were removed"
    assert list(out.iterdir()) == []  # no model, no plan, no temporary file or folder
    assert {path: digest(path) for path in inputs} == inputs


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


def test_ctrl_c_during_prune_leaves_nothing_behind(folders):
    inputs_dir, out = folders
    model = inputs_dir / "resnet20.onnx"
    model.write_bytes(RESNET20.read_bytes())
    for copies in (1, 4, 16):
        data = calibration(inputs_dir, copies)
        inputs = {model: digest(model), data: digest(data)}
        result = interrupted(["prune", str(model), "--data", str(data), "--remove-blocks", "6", "--batch", "32",
                              "-o", str(out / "pruned.onnx")], ready="slp: scored")
        if result is not None:
            check(result, out, inputs)
            return
        for path in out.iterdir():  # a finished run: clear its outputs and try a larger workload
            path.unlink()
    pytest.fail("prune finished before SIGINT at every workload")


def test_ctrl_c_during_heal_leaves_nothing_behind(folders):
    pytest.importorskip("torch")
    inputs_dir, out = folders
    model = inputs_dir / "resnet20.onnx"
    model.write_bytes(RESNET20.read_bytes())
    data = calibration(inputs_dir, 1)
    inputs = {model: digest(model), data: digest(data)}
    for steps in (2000, 20000):
        result = interrupted(["heal", str(model), "--teacher", str(model), "--data", str(data), "--steps", str(steps),
                              "--heal-batch", "16", "-o", str(out / "healed.onnx")], ready="samples to train on")
        if result is not None:
            check(result, out, inputs)
            return
        for path in out.iterdir():
            path.unlink()
    pytest.fail("heal finished before SIGINT at every workload")


@pytest.mark.parametrize("debug", [False, True])
def test_an_interrupt_between_the_model_and_its_plan_removes_the_model(folders, monkeypatch, capsys, debug):
    """In-process: Ctrl-C arrives while the plan is written, after the model was: neither is left."""
    from onnxprune import api
    from onnxprune.cli import main

    inputs_dir, out = folders

    def interrupted_save_plan(plan, path):
        assert (out / "pruned.onnx").exists()  # the model is written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "save_plan", interrupted_save_plan)
    status = main(["prune", str(RESNET20), "--data", str(CALIB), "--samples", "32", "--remove-blocks", "1",
                   "-o", str(out / "pruned.onnx"), "--quiet"] + (["--debug"] if debug else []))
    err = capsys.readouterr().err
    assert status == EXIT_INTERRUPTED
    assert err.strip().splitlines()[-1] == "onnxprune: error: interrupted; the outputs of this run were removed"
    assert ("Traceback" in err) == debug
    assert debug or len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []
