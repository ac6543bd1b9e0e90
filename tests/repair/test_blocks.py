"""Maps for single removed blocks (LayerMerge's "replace by a fitted map": docs/algorithms.md sections 4.1 and 8),
and repair restricted to the blocks a plan names."""

import numpy as np
import onnx
import pytest

from onnxprune.data.sources import Dataset
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph
from onnxprune.importance.layermerge import row_importances
from onnxprune.options import RepairOptions
from onnxprune.plan import Plan, PlanError, apply_plan, load_plan, save_plan
from onnxprune.planning import blocks
from onnxprune.planning.candidates import FittedMap, conv_l1_norms
from onnxprune.repair.blocks import block_cuts, fit_block_maps
from onnxprune.repair.linear import reference_of, repair, with_placeholder_maps
from onnxprune.runtime.capture import feature_tensor
from onnxprune.speedup import normalized
from tests.builders import GraphBuilder
from tests.conftest import run


def linear_blocks(relu_stem: bool = True, seed: int = 0) -> onnx.ModelProto:
    """stem conv 3x3 (ReLU or not), three blocks x + conv1x1(conv1x1(x)) each followed by a ReLU, head conv 3x3.
    A block's branch is linear, so a 1x1 map fitted for it gives the original back."""
    g = GraphBuilder(("N", 3, 6, 6), seed=seed)
    x = g.conv(g.input, 8)
    x = g.relu(x) if relu_stem else x
    for _ in range(3):
        x = g.relu(g.add(x, g.conv(g.conv(x, 8, k=1), 8, k=1)))
    return infer_shapes(g.build([g.conv(x, 4)]))


def data(n=96, seed=1):
    return Dataset({"input": np.random.default_rng(seed).normal(size=(n, 3, 6, 6)).astype(np.float32)}, None, "test")


def test_each_block_has_one_cut_with_the_map_s_shape_and_whether_it_folds():
    for relu_stem, folds_first in ((True, False), (False, True)):
        model = linear_blocks(relu_stem)
        joins = [b.join for b in analyze_model(model).residual_blocks]
        cuts, notes = block_cuts(normalized(model), joins)
        assert list(cuts) == joins and not notes
        assert {c.fitted_map.shape for c in cuts.values()} == {(8, 6, 6)}
        assert all(c.fitted_map.axis == 0 and c.fitted_map.conv for c in cuts.values())
        # the first block reads the stem conv's output alone when no ReLU follows it: its map folds into the stem
        assert [c.fitted_map.folds for c in cuts.values()] == [folds_first, False, False]
        assert not any(c.fitted_map.folds for c in block_cuts(normalized(model), joins, fold=False)[0].values())


def test_a_map_fitted_for_a_linear_block_recovers_it_and_scores_better_than_removal():
    model = linear_blocks()
    s = analyze_model(model)
    base = normalized(model)
    options = blocks.search_space(s, conv_l1_norms(to_graph(model)))
    cuts, _ = block_cuts(base, [o.remove_block for o in options if o.remove_block])
    fitted, _ = fit_block_maps(base, cuts, data(), RepairOptions(ridge=0.0), "cpu")
    assert all(m.error_after < 1e-8 < m.error_before for m in fitted.values())
    options += blocks.replace_options(options, {j: c.fitted_map for j, c in cuts.items()})
    maps = {j: (c.cut, fitted[j]) for j, c in cuts.items()}
    rows, _ = row_importances(model, s, options, data(32, seed=2), feature_tensor(model), provider="cpu", maps=maps)
    removal = {r.option.remove_block: r.importance for r in rows if r.option.remove_block and not r.option.fitted_map}
    replaced = {r.option.remove_block: r.importance for r in rows if r.option.fitted_map}
    assert set(replaced) == set(removal) == set(cuts)
    for join in cuts:
        assert replaced[join] > removal[join] and replaced[join] > -1e-5  # CKA ~ 1: the map gives the block back


def token_blocks(seed: int = 3) -> onnx.ModelProto:
    """Tokens (N, 5, 8) through three linear blocks x + (x W1) W2 off the conv chain, then a MatMul head."""
    g = GraphBuilder(("N", 5, 8), seed=seed)
    x = g.input
    for _ in range(3):
        h = g.node("MatMul", [x, g.const(g.rng.normal(0, 0.3, (8, 16)).astype(np.float32))])
        x = g.add(x, g.node("MatMul", [h, g.const(g.rng.normal(0, 0.3, (16, 8)).astype(np.float32))]))
    return infer_shapes(g.build([g.node("MatMul", [x, g.const(g.rng.normal(0, 0.3, (8, 3)).astype(np.float32))])]))


def test_blocks_off_the_chain_get_a_token_map_option_scored_like_the_others():
    model = token_blocks()
    s = analyze_model(model)
    options = blocks.search_space(s, conv_l1_norms(to_graph(model)))
    cuts, notes = block_cuts(normalized(model), [o.remove_block for o in options if o.remove_block])
    assert len(cuts) == 3 and not notes
    assert {c.fitted_map for c in cuts.values()} == {FittedMap((5, 8), 1, False)}  # a MatMul and an Add
    tokens = Dataset({"input": np.random.default_rng(1).normal(size=(64, 5, 8)).astype(np.float32)}, None, "test")
    fitted, _ = fit_block_maps(normalized(model), cuts, tokens, RepairOptions(ridge=0.0), "cpu")
    twins = blocks.replace_options(options, {j: c.fitted_map for j, c in cuts.items()})
    assert [(o.start, o.end) for o in twins] == [(o.start, o.end) for o in options if o.remove_block]
    maps = {j: (c.cut, fitted[j]) for j, c in cuts.items()}
    rows, _ = row_importances(model, s, options + twins, tokens, model.graph.output[0].name, provider="cpu",
                              maps=maps)
    removal = {r.option.remove_block: r.importance for r in rows if r.option.remove_block and not r.option.fitted_map}
    replaced = {r.option.remove_block: r.importance for r in rows if r.option.fitted_map}
    assert all(replaced[j] > removal[j] and replaced[j] > -1e-5 for j in cuts)


def test_a_replace_option_without_a_fitted_map_is_refused_not_scored_as_a_removal():
    model = linear_blocks()
    s = analyze_model(model)
    options = blocks.search_space(s, conv_l1_norms(to_graph(model)))
    cuts, _ = block_cuts(normalized(model), [o.remove_block for o in options if o.remove_block])
    twins = blocks.replace_options(options, {j: c.fitted_map for j, c in cuts.items()})
    from onnxprune.importance.layermerge import row_copies

    copies = row_copies(model, s, options + twins, feature_tensor(model))
    assert [o for o, _ in copies.refused] == twins
    assert all("no map was fitted" in why for _, why in copies.refused)


def test_repair_maps_only_the_blocks_the_plan_names():
    model = linear_blocks()
    joins = [b.join for b in analyze_model(model).residual_blocks]
    plan = Plan(remove_blocks=[joins[0], joins[2]], repair_blocks=[joins[2]])
    pruned, _ = apply_plan(model, plan)
    result = repair(pruned, model, data(), RepairOptions(ridge=0.0), blocks=plan.repair_blocks)
    onnx.checker.check_model(result.model, full_check=True)
    target = next(b.output for b in analyze_model(model).residual_blocks if b.join == joins[2])
    assert [m["target"] for m in result.record["maps"]] == [target] and result.record["blocks"] == [joins[2]]
    assert any("left without a map" in note for note in result.record["notes"])
    everywhere = repair(pruned, model, data(), RepairOptions(ridge=0.0))
    assert len(everywhere.record["maps"]) == 2 and "blocks" not in everywhere.record
    reference = reference_of(model)
    placeholder = with_placeholder_maps(pruned, reference, blocks=plan.repair_blocks)
    assert [n.op_type for n in placeholder.graph.node] == [n.op_type for n in result.model.graph.node]
    assert len(with_placeholder_maps(pruned, reference, blocks=[]).graph.node) == len(pruned.graph.node)
    assert result.record["maps"][0]["error_after"] < result.record["maps"][0]["error_before"]
    # a linear block removed and named: repaired exactly, the original's outputs come back
    alone, _ = apply_plan(model, Plan(remove_blocks=[joins[1]], repair_blocks=[joins[1]]))
    exact = repair(alone, model, data(), RepairOptions(ridge=0.0), blocks=[joins[1]]).model
    feeds = {"input": np.random.default_rng(3).normal(size=(4, 3, 6, 6)).astype(np.float32)}
    want = run(model, feeds)[0]
    np.testing.assert_allclose(run(exact, feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_plans_keep_repair_blocks_and_older_plans_still_load(tmp_path):
    model = linear_blocks()
    joins = [b.join for b in analyze_model(model).residual_blocks]
    plan = Plan(remove_blocks=joins[:2], repair_blocks=[joins[1]])
    loaded = load_plan(save_plan(plan, tmp_path / "p.json"))
    assert loaded.repair_blocks == [joins[1]] and loaded.remove_blocks == joins[:2]
    old = Plan(remove_blocks=joins[:1]).to_dict()
    assert "repair_blocks" not in old and Plan.from_dict(old).repair_blocks is None
    with pytest.raises(PlanError, match="does not remove"):
        apply_plan(model, Plan(remove_blocks=[joins[0]], repair_blocks=[joins[1]]))
    with pytest.raises(PlanError, match="repair_blocks"):
        Plan.from_dict({"remove_blocks": [joins[0]], "repair_blocks": joins[0]})
