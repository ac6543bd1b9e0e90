"""A LayerMerge speed-up search with repair: every removable block may be kept, removed, or replaced by a fitted
map (docs/algorithms.md section 4.1), the plan says which removed blocks get a map, and only those do."""

import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.data.sources import Dataset
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes, load_model
from onnxprune.graph.normalize import to_graph
from onnxprune.latency.backends import get_backend
from onnxprune.latency.table import LatencyTable, row_signature
from onnxprune.options import RepairOptions
from onnxprune.plan import apply_plan, fingerprint, load_plan
from onnxprune.planning import blocks
from onnxprune.planning.candidates import conv_l1_norms
from onnxprune.repair.blocks import block_cuts
from onnxprune.repair.linear import repair
from onnxprune.runtime.capture import feature_tensor
from onnxprune.speedup import Measurement, layermerge_to_speedup, normalized
from tests.builders import GraphBuilder
from tests.conftest import run
from tests.test_speedup import deep_net


def linear_and_empty_blocks() -> onnx.ModelProto:
    """stem conv 3x3 + ReLU; block A: x + conv1x1(conv1x1(x)) (linear: a fitted 1x1 map gives it back); block B:
    the same with a zero second conv (removing it changes nothing); a ReLU after each join; head conv 3x3."""
    g = GraphBuilder(("N", 3, 6, 6), seed=4)
    x = g.relu(g.conv(g.input, 8))
    x = g.relu(g.add(x, g.conv(g.conv(x, 8, k=1), 8, k=1)))
    zero = [g.const(np.zeros((8, 8, 1, 1), np.float32)), g.const(np.zeros(8, np.float32), "b")]
    branch = g.node("Conv", [g.conv(x, 8, k=1), *zero], 8, kernel_shape=[1, 1], pads=[0, 0, 0, 0])
    x = g.relu(g.add(x, branch))
    return infer_shapes(g.build([g.conv(x, 4)]))


def calibration(model, n=96, seed=1) -> Dataset:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return Dataset({"input": np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)}, None, "test")


def hand_table(model, s, map_rows: bool = True) -> LatencyTable:
    """Every conv row 0.1 ms, a map row 0.01 ms (none with ``map_rows=False``), 0.4 ms outside the rows."""
    options = blocks.search_space(s, conv_l1_norms(to_graph(model)))
    cuts, _ = block_cuts(normalized(model), [b.join for b in s.residual_blocks])
    options += blocks.replace_options(options, {j: c.fitted_map for j, c in cuts.items()}) if map_rows else []
    rows = {row_signature(o, s, 2): 1e-5 if o.fitted_map else 1e-4 for o in options}
    rows.pop(None, None)
    return LatencyTable({"name": "hand"}, 2, "float32", fingerprint(model), 1e-3, 4e-4, rows)


def search(model, table, data):
    """One solve (no second attempt: the plan is the DP's for this table) at a chain budget of 0.215 ms: two blocks
    must go (0.39 ms of 0.6), and two maps (0.38 ms saved) are not enough."""
    how = Measurement(get_backend("ort-cpu", threads=1), 2, rounds=3)
    return layermerge_to_speedup(model, data, feature_tensor(model), 1e-3 / 6.15e-4, how, table=table,
                                 max_attempts=1, repair=RepairOptions(ridge=0.0))


def test_the_search_mixes_keep_remove_and_replace_and_repair_follows_the_plan():
    model = linear_and_empty_blocks()
    s = analyze_model(model)
    block_a, block_b = [b.join for b in s.residual_blocks]
    data = calibration(model)
    result = search(model, hand_table(model, s), data)
    plan = result.plan
    assert plan.remove_blocks == [block_a, block_b] and plan.repair_blocks == [block_a]
    assert [r["kind"] for r in plan.predicted["rows"]] == ["replace block by a map", "remove block"]
    assert plan.predicted["rows"][0]["latency_s"] == pytest.approx(1e-5)
    assert result.verification.passed
    repaired = repair(result.model, model, data, RepairOptions(ridge=0.0), blocks=plan.repair_blocks)
    assert len(repaired.record["maps"]) == 1  # block B, removed without a map, gets none
    feeds = {"input": calibration(model, 4, seed=9).inputs["input"]}
    want = run(model, feeds)[0]  # A's map gives A back, and B did nothing
    np.testing.assert_allclose(run(repaired.model, feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_table_measured_without_map_rows_leaves_the_maps_out_and_says_so():
    model = linear_and_empty_blocks()
    s = analyze_model(model)
    result = search(model, hand_table(model, s, map_rows=False), calibration(model))
    assert result.plan.repair_blocks == [] and len(result.plan.remove_blocks) == 2  # removed, without maps
    assert sum("measured without repair" in note for note in result.notes) == 2


def test_prune_layermerge_with_repair_puts_maps_only_where_the_plan_says(tmp_path, capsys):
    model = deep_net()  # six basic blocks of random 3x3 convs
    path, data, out = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "fast.onnx"
    onnx.save(model, path)
    np.savez(data, x=calibration(model, 64).inputs["input"])
    code = main(["prune", str(path), "--method", "layermerge", "--speedup", "1.3", "--data", str(data),
                 "--repair", "linear", "--latency-batch", "4", "--rounds", "3", "--threads", "1", "-o", str(out),
                 "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == (0 if result["target_met"] else 4)
    plan = load_plan(tmp_path / "fast.plan.json")
    assert plan.repair_blocks is not None and set(plan.repair_blocks) <= set(plan.remove_blocks)
    assert result["verification"]["passed"] and result["repaired_verification"]["passed"]
    outputs = {b.join: b.output for b in analyze_model(model).residual_blocks}
    assert sorted(m["target"] for m in result["repair"]["maps"]) == sorted(outputs[j] for j in plan.repair_blocks)
    written = load_model(out)
    assert sum(n.name.endswith("/repair") for n in written.graph.node) == sum(
        m["placed"].startswith("inserted") for m in result["repair"]["maps"])
    plain, _ = apply_plan(model, plan)  # the plan replays; the maps come with repair alone
    assert len(written.graph.node) == len(plain.graph.node) + sum(
        m["placed"].startswith("inserted") for m in result["repair"]["maps"])


@pytest.mark.parametrize("repair_rows", [True, False])
def test_latency_verb_times_map_rows_that_prune_repair_then_uses(tmp_path, capsys, repair_rows):
    """``latency --repair linear`` writes a row for every map that may replace a block (here unfolded, so each has
    one); ``prune --repair linear --latency-table`` with it keeps the map options, without them it says why not."""
    model = linear_and_empty_blocks()
    path, data, table_path = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "table.json"
    onnx.save(model, path)
    np.savez(data, x=calibration(model, 32).inputs["input"])
    code = main(["latency", str(path), "--batch", "2", "--rounds", "3", "--threads", "1", "-o", str(table_path),
                 "--json", "--quiet"] + (["--repair", "linear", "--repair-no-fold"] if repair_rows else []))
    written = json.loads(capsys.readouterr().out)
    assert code == 0
    s = analyze_model(model)
    cuts, _ = block_cuts(normalized(model), [b.join for b in s.residual_blocks], fold=False)
    map_options = blocks.replace_options(blocks.search_space(s, conv_l1_norms(to_graph(model))),
                                         {j: c.fitted_map for j, c in cuts.items()})
    map_rows = {row_signature(o, s, 2) for o in map_options}
    table = json.loads(table_path.read_text())
    if repair_rows:
        assert written["map_rows"] == len(map_rows) >= 1 and map_rows <= set(table["rows"])
    else:
        assert "map_rows" not in written and not map_rows & set(table["rows"])
    code = main(["prune", str(path), "--method", "layermerge", "--speedup", "1.1", "--data", str(data),
                 "--repair", "linear", "--repair-no-fold", "--latency-table", str(table_path), "--latency-batch", "2",
                 "--rounds", "3", "--threads", "1", "-o", str(tmp_path / "fast.onnx"), "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code in (0, 4)
    left_out = [n for n in result["notes"] if "measured without repair" in n]
    assert len(left_out) == (0 if repair_rows else len(map_options))
