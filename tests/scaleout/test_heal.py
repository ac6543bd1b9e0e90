"""Healing on Ray Train (onnxprune.scaleout.heal): two workers take the steps that one process takes on the whole
batch (plain ``heal``), also after losing a worker, and one worker is plain ``heal`` too. A tiny conv net, six
steps, a local two-CPU Ray (tests/scaleout/conftest.py). Every Ray Train run starts its own processes (some 30 s on a loaded two-CPU machine),
so only the two-worker run is in the default selection; ``-m slow`` adds the other two."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("ray.train")
pytest.importorskip("torch")


from onnxprune.data.sources import Dataset  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.options import HealingOptions, RayOptions  # noqa: E402
from onnxprune.scaleout.heal import KILL_WORKER_ENV, heal_on_ray  # noqa: E402
from onnxprune.train.heal import heal  # noqa: E402
from tests.builders import GraphBuilder  # noqa: E402

# augmentation and mixup on (every worker draws them on the whole batch); the evaluations at steps 2, 4 and 6
OPTIONS = HealingOptions(steps=6, batch=8, evaluations=3, lr=1e-2, holdout=0.2)


def tiny_net() -> onnx.ModelProto:
    """conv-relu-conv-relu, global pooling, a linear classifier: 3x16x16 images, 10 classes."""
    g = GraphBuilder(("N", 3, 16, 16))
    x = g.relu(g.conv(g.relu(g.conv(g.input, 8)), 8))
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    w = g.const(g.rng.normal(0, 0.5, (10, 8)).astype(np.float32))
    b = g.const(np.zeros(10, np.float32), "b")
    return g.build([g.node("Gemm", [pooled, w, b], transB=1)])


@pytest.fixture(scope="module")
def pair():
    """(teacher, student): the student is the teacher with noise on its weights, a stand-in for a pruned model."""
    teacher = tiny_net()
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    rng = np.random.default_rng(1)
    for t in student.graph.initializer:
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a + rng.normal(0, 0.3, a.shape)).astype(a.dtype), t.name))
    return teacher, student


@pytest.fixture(scope="module")
def data():
    x = np.random.default_rng(2).standard_normal((40, 3, 16, 16)).astype(np.float32)
    return Dataset({"input": x}, None, "random")


@pytest.fixture(scope="module")
def plain(pair, data):
    teacher, student = pair
    return heal(student, teacher, data, OPTIONS, "cpu")


def max_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def check_same_run(result, plain, student) -> None:
    """The Ray run's healed model and record are plain heal's, up to float rounding."""
    record = result.record
    assert record["best_step"] == plain.record["best_step"] > 0  # healing moved the weights
    assert max_difference(result.model, student) > 1e-3
    assert max_difference(result.model, plain.model) < 1e-5
    assert [h["step"] for h in record["history"]] == [h["step"] for h in plain.record["history"]] == [0, 2, 4, 6]
    for ours, theirs in zip(record["history"], plain.record["history"]):
        assert ours.keys() == theirs.keys()
        assert all(ours[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-6) for k in ours)
    assert record.keys() >= plain.record.keys()
    for key in ("steps", "batch", "epochs", "augment", "mixup", "labels", "train_samples", "held_back_samples",
                "feature_tensor", "device"):
        assert record[key] == plain.record[key], key
    assert record["ray"] and record["seconds_per_step"] > 0 and record["seconds"] >= record["fit_seconds"] > 0
    # names and structure as they were: only initializer values change
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in result.model.graph.node] == \
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in student.graph.node]
    assert [t.name for t in result.model.graph.initializer] == [t.name for t in student.graph.initializer]
    onnx.checker.check_model(result.model, full_check=True)


def test_two_workers_take_the_steps_of_one_process(local_ray, pair, data, plain):
    """Each worker trains on its half of every batch."""
    teacher, student = pair
    result = heal_on_ray(student, teacher, data, OPTIONS, RayOptions(workers=2), "cpu")
    assert result.record["workers"] == 2 and result.record["restarts"] == 0
    check_same_run(result, plain, student)


@pytest.mark.slow
def test_a_lost_worker_is_replaced_and_the_run_resumes(local_ray, pair, data, plain, tmp_path, monkeypatch):
    """Worker 1 dies before step 5 the first time (after the evaluation at step 4): Ray Train starts a new pair,
    which resumes from that evaluation and ends where plain heal ends. (Slow: the restart starts two more worker
    processes, some 20 s here.)"""
    teacher, student = pair
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_WORKER_ENV, f"1:5:{marker}")
    result = heal_on_ray(student, teacher, data, OPTIONS, RayOptions(workers=2, max_retries=1), "cpu")
    assert marker.exists() and result.record["restarts"] == 1 and result.record["workers"] == 2
    check_same_run(result, plain, student)


@pytest.mark.slow
def test_one_worker_is_plain_heal(local_ray, pair, data, plain):
    teacher, student = pair
    result = heal_on_ray(student, teacher, data, OPTIONS, RayOptions(workers=1), "cpu")
    assert result.record["workers"] == 1 and result.record["restarts"] == 0
    check_same_run(result, plain, student)


def test_a_batch_that_does_not_split_evenly_is_refused(local_ray, pair, data):
    teacher, student = pair
    with pytest.raises(OnnxPruneError, match="multiple of 3"):
        heal_on_ray(student, teacher, data, OPTIONS, RayOptions(workers=3), "cpu")
