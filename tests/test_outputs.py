"""The files a run writes (onnxprune.outputs): atomic, remembered, and removed when the run fails or is
interrupted."""

import os
import stat

import onnx
import pytest

from onnxprune import outputs
from onnxprune.graph.io import save_model
from onnxprune.plan import Plan, save_plan
from tests.builders import GraphBuilder


def small_model() -> onnx.ModelProto:
    g = GraphBuilder((1, 3, 8, 8))
    return g.build([g.relu(g.conv(g.input, 4))])


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        outputs.write_atomically(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_written_file_has_the_usual_permissions(tmp_path):
    path = outputs.write_text(tmp_path / "sub" / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.read_text() == "x"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_run_that_raises_removes_what_it_wrote_and_nothing_else(tmp_path, error):
    before = tmp_path / "input.onnx"
    before.write_bytes(b"input")
    with pytest.raises(error), outputs.run_outputs() as written:
        save_model(small_model(), tmp_path / "m.onnx")
        save_plan(Plan(remove_blocks=[]), tmp_path / "m.plan.json")
        outputs.write_bytes(tmp_path / "m.png", b"png")
        assert [p.name for p in written] == ["m.onnx", "m.plan.json", "m.png"]
        raise error()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.onnx"]
    assert before.read_bytes() == b"input"


def test_a_run_that_returns_keeps_its_files_and_an_inner_run_reports_to_the_outer(tmp_path):
    with pytest.raises(KeyboardInterrupt), outputs.run_outputs():
        with outputs.run_outputs():
            outputs.write_text(tmp_path / "inner.txt", "x")
        assert (tmp_path / "inner.txt").exists()
        raise KeyboardInterrupt
    assert not (tmp_path / "inner.txt").exists()
    with outputs.run_outputs():
        outputs.write_text(tmp_path / "kept.txt", "x")
    assert (tmp_path / "kept.txt").read_text() == "x"


def test_outside_a_run_nothing_is_remembered(tmp_path):
    outputs.write_text(tmp_path / "a.txt", "x")
    with outputs.run_outputs() as written:
        pass
    assert written == []
