import numpy as np
import pytest

from onnxprune.errors import OnnxPruneError
from onnxprune.graph.io import infer_shapes
from onnxprune.latency.backends import (LAYOUT_OPS, OverheadClock, ProfiledClock, get_backend, kernel_node_shares,
                                        kernel_seconds, overhead_model)
from onnxprune.latency.measure import random_feeds
from tests.builders import GraphBuilder
from tests.conftest import run


def event(name, op, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "args": {"op_name": op}}


def test_kernel_seconds_sums_each_run_without_layout_conversions():
    events = [{"cat": "Session", "name": "model_run", "dur": 999}]
    for k in range(3):
        events += [event("in", "ReorderInput", 50), event("conv", "Conv", 100 + k), event("relu", "Relu", 10),
                   event("out", "ReorderOutput", 40)]
    assert kernel_seconds(events, 3) == pytest.approx([110e-6, 111e-6, 112e-6])
    with pytest.raises(OnnxPruneError, match="4 runs"):
        kernel_seconds(events, 4)


def test_profiled_clock_gives_one_time_per_run_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    g = GraphBuilder((2, 16, 8, 8))
    model = infer_shapes(g.build([g.relu(g.conv(g.input, 16))]))  # 16 channels: onnxruntime's NCHWc layout
    clock = ProfiledClock(model, random_feeds(model, 2), threads=1)
    for _ in range(4):
        clock()
    seconds = clock.seconds()
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert clock.seconds() == seconds  # read once, kept
    assert not list(tmp_path.iterdir())
    assert {"ReorderInput", "ReorderOutput"} == LAYOUT_OPS


def test_kernel_node_shares_map_fused_and_renamed_kernels_to_graph_nodes():
    """A kernel belongs to the node of its name, or to the node whose output it is named after (NCHWc kernels);
    layout conversions and kernels of no node are left out; shares are medians over runs of kernel / wall."""
    g = GraphBuilder((1, 16, 8, 8))
    model = infer_shapes(g.build([g.conv(g.relu(g.conv(g.input, 16)), 16)]))
    conv1, relu, conv2 = model.graph.node
    events = []
    for k in range(3):
        events += [event("in", "ReorderInput", 50), event(f"{relu.output[0]}_nchwc", "FusedConv", 100 + 10 * k),
                   event(conv2.name, "Conv", 30), event("inserted_by_the_runtime", "Add", 5)]
    walls = [1e-3, 2e-3, 4e-3]
    shares = kernel_node_shares(events, walls, model)
    assert set(shares) == {relu.name, conv2.name}  # conv1 is fused into the kernel named after relu's output
    assert shares[relu.name] == pytest.approx(np.median([100e-6 / 1e-3, 110e-6 / 2e-3, 120e-6 / 4e-3]))
    assert shares[conv2.name] == pytest.approx(30e-6 / 2e-3)
    with pytest.raises(OnnxPruneError, match="4 runs"):
        kernel_node_shares(events, walls + [1e-3], model)


def test_profiled_clock_reads_node_shares_of_its_runs_and_then_stops():
    g = GraphBuilder((2, 16, 8, 8))
    model = infer_shapes(g.build([g.conv(g.relu(g.conv(g.input, 16)), 16)]))
    clock = ProfiledClock(model, random_feeds(model, 2), threads=1)
    for _ in range(5):
        clock()
    shares = clock.node_shares()
    assert set(shares) <= {n.name for n in model.graph.node} and shares and all(v > 0 for v in shares.values())
    assert sum(shares.values()) < 1  # kernels take part of each run's wall time
    assert len(clock.seconds()) == clock.runs == 5
    with pytest.raises(OnnxPruneError, match="no more"):
        clock()


def test_overhead_model_returns_its_input():
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    (y,) = run(overhead_model(feeds), feeds)
    assert np.array_equal(y, feeds["x"])


def test_cpu_rows_and_their_reference_run_under_the_profiler():
    g = GraphBuilder((1, 4, 8, 8))
    model = infer_shapes(g.build([g.relu(g.conv(g.input, 4))]))
    feeds = random_feeds(model, 1)
    backend = get_backend("ort-cpu", threads=1)
    assert isinstance(backend.reference_runner(model, feeds), ProfiledClock)
    assert isinstance(backend.own_clock(model, feeds), ProfiledClock)


def test_overhead_clock_subtracts_the_identity_run_and_keeps_a_floor():
    clock = OverheadClock(lambda: 0.004, lambda: 0.001)  # runners timed on a device return their seconds
    clock()
    floor = OverheadClock(lambda: 0.004, lambda: 0.005)
    floor()
    assert clock.seconds() == pytest.approx([0.003]) and floor.seconds() == pytest.approx([0.0002])


def test_torch_backend_times_the_torch_copy_and_its_rows():
    pytest.importorskip("torch")
    import torch

    from onnxprune.latency.backends import BackendUnavailable
    from onnxprune.latency.measure import compare

    g = GraphBuilder((2, 8, 8, 8))
    small = infer_shapes(g.build([g.relu(g.conv(g.input, 8))]))
    g = GraphBuilder((2, 8, 8, 8))
    big = infer_shapes(g.build([g.relu(g.conv(g.relu(g.conv(g.relu(g.conv(g.input, 64)), 64)), 8))]))
    backend = get_backend("torch", threads=1)
    assert backend.name == ("torch-cuda" if torch.cuda.is_available() else "torch-cpu")
    assert "torch" in backend.describe()["versions"]
    cpu = get_backend("torch-cpu", threads=1)
    assert cpu.time(small, random_feeds(small, 2), warmup=1, repeats=3) > 0
    measured = compare([big, small], cpu, 2, 5)
    assert measured.speedups[1] > 1  # three convs of 64 channels against one of 8
    clock = cpu.own_clock(small, random_feeds(small, 2))
    clock()
    assert len(clock.seconds()) == 1
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            get_backend("torch-cuda")
