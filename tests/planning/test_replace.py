"""LayerMerge's third block option, "replace the block by a fitted map" (docs/algorithms.md section 4.1): the DP
weighs keep / remove / replace by their latency rows and importances."""


import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph
from onnxprune.latency.table import LatencyTable, row_signature
from onnxprune.plan import Plan, apply_plan
from onnxprune.planning import blocks
from onnxprune.planning.candidates import FittedMap, conv_l1_norms, options_plan
from onnxprune.planning.dp import Row, solve
from tests.builders import GraphBuilder, residual_block
from tests.planning.test_dp import assert_solves_like_brute_force, tilings

BATCH = 2


def small_resnet():
    """stem conv, three basic blocks of 8 channels at 8x8, head conv: chain convs 0..7, blocks over 1..3, 3..5, 5..7;
    the model, its analysis and its LayerMerge options."""
    g = GraphBuilder(("N", 3, 8, 8))
    x = g.relu(g.bn(g.conv(g.input, 8)))
    for _ in range(3):
        x = residual_block(g, x)
    model = infer_shapes(g.build([g.conv(x, 4)]))
    s = analyze_model(model)
    return model, s, blocks.search_space(s, conv_l1_norms(to_graph(model)))


@pytest.fixture(scope="module")
def resnet():
    return small_resnet()


def hand_table(s, options, map_s: float) -> LatencyTable:
    """Every conv row 1 ms, every map row ``map_s``, fixed part 1 ms."""
    rows = {row_signature(o, s, BATCH): (map_s if o.fitted_map else 1e-3) for o in options}
    rows.pop(None, None)
    whole = 1e-3 + sum(rows[row_signature(o, s, BATCH)] for o in options if o.original)
    return LatencyTable({"name": "hand"}, BATCH, "float32", "none", whole, 1e-3, rows)


def with_maps(s, options, folds=False):
    maps = {o.remove_block: FittedMap((8, 8, 8), 0, folds) for o in options if o.remove_block}
    return options + blocks.replace_options(options, maps)


def importance(option, replace: float, remove: float) -> float:
    if option.original:
        return 0.0
    if option.remove_block is not None:
        return replace if option.fitted_map else remove
    return -10.0  # merges and dropped convs: never worth it here


def chosen(s, options, table, budget, replace=-0.1, remove=-1.0):
    rows = [Row(o.start, o.end, table.option_latency(o, s), importance(o, replace, remove), o) for o in options]
    solution = solve(rows, blocks.positions(s, options), budget, budget / 2000)
    return [r.key for r in solution.rows if not r.key.original]


def test_every_removal_gets_a_replace_twin_with_the_map_s_row(resnet):
    model, s, options = resnet
    options = with_maps(s, options)
    removals = [o for o in options if o.remove_block and not o.fitted_map]
    replaces = [o for o in options if o.fitted_map]
    assert len(removals) == len(replaces) == 3
    assert [(o.start, o.end, o.remove_block) for o in replaces] == [(o.start, o.end, o.remove_block) for o in removals]
    assert {row_signature(o, s, BATCH) for o in replaces} == {"map conv k1 [2, 8, 8, 8]"}
    assert all(row_signature(o, s, BATCH) is None for o in removals)
    assert not any(o.original for o in replaces)
    table = hand_table(s, options, 2e-4)
    assert table.option_latency(replaces[0], s) == pytest.approx(2e-4)
    assert table.option_latency(removals[0], s) == 0.0
    folded = with_maps(s, resnet[2], folds=True)
    assert all(row_signature(o, s, BATCH) is None and table.option_latency(o, s) == 0.0
               for o in folded if o.fitted_map)  # a map folded into its neighbour costs nothing


def test_the_plan_records_which_removed_blocks_get_a_map(resnet):
    model, s, options = resnet
    options = with_maps(s, options)
    replace = next(o for o in options if o.fitted_map)
    remove = next(o for o in options if o.remove_block and not o.fitted_map and o.remove_block != replace.remove_block)
    plan = Plan(**options_plan([replace, remove]))
    assert plan.remove_blocks == [replace.remove_block, remove.remove_block]
    assert plan.repair_blocks == [replace.remove_block]
    assert "repair_blocks" not in options_plan([remove])  # plain removals: the key stays out of the plan
    pruned, summary = apply_plan(model, plan)  # the rewrite is the removal's: the map comes with repair
    assert summary["removed_blocks"] == plan.remove_blocks


def test_the_dp_replaces_when_the_map_scores_better_at_equal_latency(resnet):
    model, s, options = resnet
    options = with_maps(s, options, folds=True)  # a folded map: the same latency as removal
    table = hand_table(s, options, 0.0)
    original = sum(table.option_latency(o, s) for o in options if o.original)
    picked = chosen(s, options, table, original - 1.9e-3)  # removing one block (two conv rows) meets it
    assert len(picked) == 1 and picked[0].fitted_map is not None
    assert Plan(**options_plan(picked)).repair_blocks == [picked[0].remove_block]
    picked = chosen(s, options, table, original - 1.9e-3, replace=-2.0)  # now the map is worse than nothing
    assert len(picked) == 1 and picked[0].remove_block and picked[0].fitted_map is None


def test_the_dp_removes_when_the_map_s_row_is_too_costly_for_the_budget(resnet):
    model, s, options = resnet
    options = with_maps(s, options)
    original = sum(hand_table(s, options, 0.0).option_latency(o, s) for o in options if o.original)
    cheap = chosen(s, options, hand_table(s, options, 2e-4), original - 1.5e-3)  # a map saves 1.8 ms of 2
    assert len(cheap) == 1 and cheap[0].fitted_map is not None
    costly = chosen(s, options, hand_table(s, options, 1.6e-3), original - 1.5e-3)  # a map saves 0.4 ms: too little
    assert len(costly) == 1 and costly[0].remove_block and costly[0].fitted_map is None
    # maps saving 0.8 ms each: three replaced blocks save too little, one replaced and one removed enough
    mixed = chosen(s, options, hand_table(s, options, 1.2e-3), original - 2.6e-3)
    assert sorted(o.fitted_map is not None for o in mixed) == [False, True]
    assert len({o.remove_block for o in mixed}) == 2


@st.composite
def three_way(draw):
    """A chain of ``n`` original rows; blocks over disjoint spans of it (keep = their original rows, remove,
    replace), and blocks off the chain (keep / remove / replace at a position of their own)."""
    n = draw(st.integers(1, 8))
    rows = [Row(p, p + 1, draw(st.floats(0.5, 5)), 0.0, ("keep", p)) for p in range(n)]
    p = 0
    while p < n - 1:
        width = draw(st.integers(1, 3))
        if p + width <= n and draw(st.booleans()):
            rows.append(Row(p, p + width, 0.0, -draw(st.floats(0.0, 3)), ("remove", p)))
            rows.append(Row(p, p + width, draw(st.floats(0.0, 4)), -draw(st.floats(0.0, 3)), ("replace", p)))
        p += width
    positions = n + draw(st.integers(0, 3))
    for k in range(n, positions):
        rows.append(Row(k, k + 1, draw(st.floats(0.5, 5)), 0.0, ("keep", k)))
        rows.append(Row(k, k + 1, 0.0, -draw(st.floats(0.0, 3)), ("remove", k)))
        rows.append(Row(k, k + 1, draw(st.floats(0.0, 4)), -draw(st.floats(0.0, 3)), ("replace", k)))
    return positions, rows, draw(st.floats(0.05, 1.0))


@settings(max_examples=150, deadline=None)
@given(three_way(), st.floats(0.0, 1.1))
def test_the_dp_with_three_options_per_block_equals_brute_force(instance, budget_fraction):
    positions, rows, unit = instance
    original = sum(r.latency for r in rows if r.key[0] == "keep")
    budget = budget_fraction * original
    assert_solves_like_brute_force(rows, positions, budget, unit, tilings(rows, positions))
