import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.cli import main
from onnxprune.data.sources import load_data
from onnxprune.graph.io import infer_shapes
from onnxprune.latency.backends import get_backend
from onnxprune.plan import apply_plan
from onnxprune.runtime.capture import feature_tensor
from onnxprune import speedup
from onnxprune.latency.measure import SideBySide
from onnxprune.speedup import (OVERSHOOT, Measurement, layermerge_to_speedup, loosened_budget, slp_to_speedup,
                               tightened_budget)
from onnxprune.verify import random_feeds, verify
from tests.builders import GraphBuilder, residual_block
from tests.conftest import run as run_model


def deep_net(seed=0):
    g = GraphBuilder(("batch", 3, 16, 16), seed=seed)
    x = g.relu(g.conv(g.input, 16))
    for _ in range(6):
        x = residual_block(g, x)
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], 16)
    w = g.const(g.rng.normal(size=(10, 16)).astype(np.float32))
    return infer_shapes(g.build([g.node("Gemm", [pooled, w, g.const(np.zeros(10, np.float32))], 10, transB=1)]))


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 0.7), st.floats(0.05, 1.0), st.floats(1.05, 3.0))
def test_a_missed_target_tightens_the_budget_by_what_the_savings_were_worth(saving, came_true, target):
    whole, predicted = 1.0, 1.0 - saving
    measured = 1 / (1 - saving * came_true)  # this share of the predicted saving came true
    if measured >= target:
        return
    budget = tightened_budget(whole, predicted, measured, target)
    assert budget < predicted
    assert budget <= predicted * measured / target + 1e-12  # never looser than the proportional rule
    wanted = (1 - 1 / target) / came_true  # the saving that, at the same yield, meets the target
    assert budget == pytest.approx(min(whole * (1 - min(wanted, 3 * saving)), predicted * measured / target))


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 0.7), st.floats(1.0, 4.0), st.floats(1.05, 3.0))
def test_an_overshoot_loosens_the_budget_by_what_the_savings_were_worth(saving, came_true, target):
    whole, predicted = 1.0, 1.0 - saving
    if saving * came_true >= 0.99:
        return
    measured = 1 / (1 - saving * came_true)  # more of the predicted saving came true than predicted
    if measured <= target * (1 + OVERSHOOT):
        return
    budget = loosened_budget(whole, predicted, measured, target)
    assert predicted <= budget <= predicted * measured / target + 1e-12  # looser, never past the proportional rule
    assert budget <= whole
    # at the same yield, the next plan's saving meets the target: 1 / (1 - yield * (1 - budget)) >= target
    assert 1 / (1 - came_true * (1 - budget)) >= target * (1 - 1e-9) or budget == predicted * measured / target


def test_a_slower_pruned_model_falls_back_to_the_proportional_rule():
    assert tightened_budget(1.0, 0.8, 0.95, 1.5) == pytest.approx(0.8 * 0.95 / 1.5)


def _side_by_side(original_s, pruned_s):
    return SideBySide([original_s, pruned_s], [1.0, original_s / pruned_s], 25, 1, [[original_s], [pruned_s]])


@pytest.mark.parametrize("expected_s, calls, kept", [
    (None, 1, 1.32),  # nothing to compare with: the one measurement
    (4.6e-3, 2, 0.94),  # the original ran 1.7x slower than expected: measured again, the second kept
    (7.8e-3, 1, 1.32),  # as expected (the machine was slow all along): one measurement
])
def test_an_original_measured_off_its_expected_time_is_measured_again(monkeypatch, expected_s, calls, kept):
    # on a small VM, spinning off, MobileNetV2's original ran 7.8 ms in slow spells and 4.6 ms outside them, and a
    # plan read 1.32x in the spells, 0.94x outside (benchmarks/RESULTS.md)
    readings = iter([_side_by_side(7.8e-3, 5.9e-3), _side_by_side(4.6e-3, 4.9e-3)])
    made = []
    monkeypatch.setattr(speedup, "compare", lambda *args, **kwargs: made.append(1) or next(readings))
    model = deep_net()
    t_original, t_pruned, measured, _ = speedup._measure(model, model, Measurement(get_backend("ort-cpu"), 1),
                                                         expected_s)
    assert len(made) == calls
    assert measured == pytest.approx(kept, abs=0.01)
    assert t_original / t_pruned == pytest.approx(measured)


@pytest.mark.parametrize("method", ["layermerge", "slp"])
def test_speedup_result_is_consistent_and_verified(method):
    model = deep_net()
    data = load_data("random", model, samples=16)
    backend = get_backend("ort-cpu", threads=1)
    run = layermerge_to_speedup if method == "layermerge" else slp_to_speedup
    result = run(model, data, feature_tensor(model), 1.3, Measurement(backend, 4))
    assert result.met == (result.speedup >= 1.3)
    assert result.speedup > 0 and result.original_s > 0 and result.pruned_s > 0  # the speed-up is read within rounds
    assert result.verification.passed
    assert result.verification.finite and result.verification.agreement is not None  # (N, 10) logits
    replay, _ = apply_plan(model, result.plan)
    assert verify(model, replay).passed
    feeds = random_feeds(model)
    assert np.array_equal(run_model(replay, feeds)[0], run_model(result.model, feeds)[0])  # the plan replays exactly
    if method == "layermerge":
        assert 1 <= len(result.attempts) <= 4 and {"candidates", "importance", "dp", "latency table"} <= set(result.stages)
        assert all(a["predicted_s"] > 0 for a in result.attempts)
        assert result.speedup in [a["speedup"] for a in result.attempts]
        assert result.met or result.speedup == max(a["speedup"] for a in result.attempts)


def test_cli_speedup_latency_and_bench(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save(deep_net(1), path)
    table = tmp_path / "table.json"
    # batch 32: at smaller batches this tiny net is mostly per-call overhead, and its rows, timed alone, can
    # add up to more than the whole model on a loaded machine (a table the latency verb refuses)
    assert main(["latency", str(path), "--batch", "32", "--rounds", "5", "-o", str(table), "--threads", "1"]) == 0
    capsys.readouterr()
    assert json.loads(table.read_text())["rounds"] == 5
    out = tmp_path / "fast.onnx"
    code = main(["prune", str(path), "--speedup", "1.25", "--data", "random", "--samples", "16", "--latency-batch",
                 "32", "--latency-table", str(table), "-o", str(out), "--json", "--quiet",
                 "--pareto", str(tmp_path / "curve.json"), "--scope", "local"])
    captured = capsys.readouterr()
    assert captured.out, captured.err
    result = json.loads(captured.out)
    assert code == (0 if result["target_met"] else 4)
    assert result["method"] == "layermerge" and out.exists() and result["verification"]["passed"]
    assert result["verification"]["finite"]
    if not result["target_met"]:
        assert "misses" in result["message"]
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve[-1]["rows_changed"] == 0 and curve[-1]["importance"] == 0.0  # the full budget keeps the original
    assert all(a["predicted_latency_s"] <= b["predicted_latency_s"] for a, b in zip(curve, curve[1:]))
    assert main(["prune", str(path), "--speedup", "1.25", "--latency-batch", "4", "--latency-table", str(table),
                 "-o", str(tmp_path / "x.onnx"), "--quiet"]) == 2
    assert "batch 32, not 4" in capsys.readouterr().err
    assert main(["bench", str(path), str(out), "--batch", "2", "--rounds", "2", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert len(bench["models"]) == 2 and bench["speedup"] > 0 and bench["rounds"] == 2


@pytest.mark.parametrize("method", ["layermerge", "slp"])
def test_demo_runs_the_whole_pipeline_on_shipped_data(tmp_path, capsys, method):
    g = GraphBuilder(("batch", 3, 32, 32), seed=4)
    x = g.relu(g.conv(g.input, 8, stride=2))
    for _ in range(4):
        x = residual_block(g, x)
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], 8)
    w = g.const(g.rng.normal(size=(10, 8)).astype(np.float32))
    model = infer_shapes(g.build([g.node("Gemm", [pooled, w, g.const(np.zeros(10, np.float32))], 10, transB=1)]))
    prep = {"input": "input", "layout": "NCHW", "size": [32, 32], "scale": 1 / 255,
            "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
    model.metadata_props.add(key="onnxprune.preprocess", value=json.dumps(prep))
    onnx.save(model, tmp_path / "cifar_like.onnx")
    shipped = np.load(Path(__file__).resolve().parents[1] / "models" / "cifar10_test1000.npz")
    np.savez(tmp_path / "test200.npz", x=shipped["x"][:200], y=shipped["y"][:200])
    code = main(["demo", "--model", str(tmp_path / "cifar_like.onnx"), "--out", str(tmp_path / "demo"),
                 "--speedup", "1.2", "--latency-batch", "4", "--json", "--method", method, "--heal-steps", "20"]
                + (["--test-data", str(tmp_path / "test200.npz")] if method == "slp" else ["--no-repair"]))
    result = json.loads(capsys.readouterr().out)
    assert code == (0 if result["pruned"]["target_met"] else 4)
    assert 0 <= result["accuracy_healed"] <= 1 and result["healed"]["healing"]["steps"] == 20
    assert not result["healed"]["healing"]["labels"]  # the demo heals without labels
    repaired = method == "slp"  # the layermerge case runs with --no-repair
    assert ("accuracy_repaired" in result) == repaired and ("repair" in result["pruned"]) == repaired
    healed = f"cifar_like_{method}_1.2x{'_repaired' if repaired else ''}_healed.onnx"
    assert (tmp_path / "demo" / healed).exists()
    assert 0 <= result["accuracy_after"] <= 1
    assert result["test_data"].endswith("(200 samples)" if method == "slp" else "(1000 samples)")
    assert result["pruned"]["method"] == method
    assert (tmp_path / "demo" / f"cifar_like_{method}_1.2x.onnx").exists()
