import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph
from onnxprune.plan import Plan, PlanError, apply_plan, apply_prepared, fingerprint, prepare
from onnxprune.planning.blocks import search_space
from onnxprune.planning.candidates import conv_l1_norms, options_plan
from onnxprune.verify import random_feeds, verify
from tests.builders import GraphBuilder, residual_block
from tests.conftest import run


def resnet(seed=0, blocks=3):
    g = GraphBuilder(("batch", 3, 12, 12), seed=seed)
    x = g.relu(g.conv(g.input, 8))
    for _ in range(blocks):
        x = residual_block(g, x)
    x = residual_block(g, x, projection=True, stride=2, cout=16)
    return infer_shapes(g.build([g.conv(x, 4, k=1)]))


def test_empty_plan_is_bit_identical():
    model = resnet()
    out, summary = apply_plan(model, Plan())
    v = verify(model, out, preserves_function=True)
    assert v.passed and v.identical and not summary["changes_function"]
    assert v.within_tolerance and all(o.max_abs == 0 for o in v.outputs)


def test_removing_a_block_equals_the_graph_built_without_it():
    def build(with_second_block: bool):
        g = GraphBuilder(("batch", 3, 12, 12), seed=5)  # same seed: the shared part draws the same weights
        x = residual_block(g, g.relu(g.conv(g.input, 8)))
        # Removal rewires the join's readers (the trailing Relu) to the block's input.
        x = residual_block(g, x) if with_second_block else g.relu(x)
        return infer_shapes(g.build([x]))

    full, reference = build(True), build(False)
    s = analyze_model(full)
    pruned, _ = apply_plan(full, Plan(remove_blocks=[s.residual_blocks[1].join]))
    feeds = random_feeds(full)
    expected = run(reference, feeds)[0]
    # BN is folded in the pruned model and not in the reference: equal to float32 rounding.
    np.testing.assert_allclose(run(pruned, feeds)[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert len(analyze_model(infer_shapes(pruned)).residual_blocks) == 1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(1, 4), data=st.data())
def test_removing_any_set_of_removable_blocks_verifies(seed, blocks, data):
    model = resnet(seed, blocks)
    s = analyze_model(model)
    removable = [b.join for b in s.residual_blocks if b.removable]
    chosen = data.draw(st.lists(st.sampled_from(removable), unique=True))
    out, summary = apply_plan(model, Plan(remove_blocks=chosen))
    v = verify(model, out)
    assert v.passed
    assert v.finite and v.identical == (not chosen) and summary["changes_function"] == bool(chosen)
    after = analyze_model(infer_shapes(out))
    assert len(after.residual_blocks) == len(s.residual_blocks) - len(chosen)
    removed_macs = sum(b.macs for b in s.residual_blocks if b.join in chosen)
    assert after.macs == s.macs - removed_macs


def test_merging_a_whole_identity_block_folds_the_identity():
    g = GraphBuilder(("batch", 8, 10, 10), seed=3)
    x = g.relu(g.conv(g.input, 8))
    a = g.conv(x, 8)  # no activation inside the block: the run is linear
    y = g.add(x, g.conv(a, 8, k=1))
    model = infer_shapes(g.build([g.relu(y)]))
    s = analyze_model(model)
    run_names = [c.name for c in s.convs[1:3]]
    out, summary = apply_plan(model, Plan(merge=[run_names]))
    assert summary["merged"][0]["identity_folded"] == s.residual_blocks[0].join
    assert not summary["changes_function"]  # linear run, 1x1 after the first conv: the function is kept
    after = analyze_model(infer_shapes(out))
    assert after.residual_blocks == [] and len(after.convs) == 2 and after.convs[1].kernel == [3, 3]
    feeds = random_feeds(model)
    a_out, b_out = run(model, feeds)[0], run(out, feeds)[0]
    np.testing.assert_allclose(b_out, a_out, rtol=1e-5, atol=1e-5 * np.abs(a_out).max())  # 1x1 after: no border band


def test_refusals_before_anything_is_written():
    model = resnet()
    s = analyze_model(model)
    projection = next(b.join for b in s.residual_blocks if b.shortcut == "projection")
    with pytest.raises(PlanError, match="not the join of a residual block"):
        apply_plan(model, Plan(remove_blocks=["no_such_node"]))
    with pytest.raises(PlanError, match="not removable"):
        apply_plan(model, Plan(remove_blocks=[projection]))
    with pytest.raises(PlanError, match="another model"):
        apply_plan(model, Plan(fingerprint="sha256:0"))
    barrier = next(link.source for link in s.links if link.barrier)
    with pytest.raises(PlanError, match=f"a {s.links[barrier].barrier} lies between"):
        apply_plan(model, Plan(merge=[[s.convs[barrier].name, s.convs[barrier + 1].name]]))
    escape = next(link.source for link in s.links if link.escape and not link.barrier)
    with pytest.raises(PlanError, match="between chain convs is also read by"):
        apply_plan(model, Plan(merge=[[s.convs[escape].name, s.convs[escape + 1].name]]))
    with pytest.raises(PlanError, match="consecutive"):
        apply_plan(model, Plan(merge=[[s.convs[1].name, s.convs[3].name]]))


def test_fingerprint_covers_the_input_shapes_and_element_types():
    def model_at(shape, seed=0):
        g = GraphBuilder(shape, seed=seed)
        return g.build([g.relu(g.conv(g.input, 8))])

    small = model_at(("batch", 3, 32, 32))
    assert fingerprint(model_at(("batch", 3, 32, 32), seed=1)) == fingerprint(small)  # weights do not count
    assert fingerprint(model_at(("batch", 3, 64, 64))) != fingerprint(small)
    assert fingerprint(model_at((1, 3, 32, 32))) != fingerprint(small)  # a fixed batch is another export
    assert fingerprint(model_at(("N", 3, 32, 32))) != fingerprint(small)
    half = model_at(("batch", 3, 32, 32))
    half.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    assert fingerprint(half) != fingerprint(small)


def test_plan_round_trips_through_json_and_rejects_typos():
    model = resnet()
    plan = Plan(remove_blocks=["a"], fingerprint=fingerprint(model), method="slp")
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(PlanError, match="unknown plan keys"):
        Plan.from_dict({"remove_block": ["x"]})
    with pytest.raises(PlanError, match="schema"):
        Plan.from_dict({"schema": 99})


def test_dropping_an_activation_by_node_or_conv_name():
    model = resnet()
    s = analyze_model(model)
    conv = s.convs[1]
    for name in (conv.name, conv.activation_nodes[0]):
        out, summary = apply_plan(model, Plan(drop_activations=[name]))
        assert summary["dropped_activations"] == [f"Relu:{conv.activation_nodes[0]}"]
        relus = [sum(n.op_type == "Relu" for n in m.graph.node) for m in (model, out)]
        assert relus[1] == relus[0] - 1
        v = verify(model, out)
        assert v.passed
        assert v.finite and not v.identical and summary["changes_function"]


def test_replace_projection_block_by_its_shortcut():
    model = resnet()
    s = analyze_model(model)
    projection = next(b for b in s.residual_blocks if b.shortcut == "projection")
    out, summary = apply_plan(model, Plan(replace_with_shortcut=[projection.join]))
    assert summary["replaced_with_shortcut"] == [projection.join] and summary["changes_function"]
    v = verify(model, out)
    assert v.passed
    assert v.finite and v.outputs[0].max_abs > 0
    after = analyze_model(infer_shapes(out))
    assert after.macs == s.macs - projection.macs and len(after.residual_blocks) == len(s.residual_blocks) - 1
    with pytest.raises(PlanError, match="not a projection"):
        apply_plan(model, Plan(replace_with_shortcut=[s.residual_blocks[0].join]))


def test_apply_keeps_external_data_beside_the_output(tmp_path):
    import onnx

    from onnxprune import api

    model = resnet()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"remove_blocks": [analyze_model(model).residual_blocks[0].join]}))
    src = tmp_path / "src.onnx"
    onnx.save(model, src, save_as_external_data=True, location="src.weights", size_threshold=0)
    result = api.apply(src, plan, tmp_path / "out" / "pruned.onnx")
    assert result.verification.passed
    assert result.verification.finite and not result.verification.preserves_function
    assert (tmp_path / "out" / "pruned.onnx.data").exists()


def test_verification_of_a_model_over_the_protobuf_limit_runs_from_disk(monkeypatch):
    from onnxprune.graph import io

    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 2**24 + 1000)  # pretend ~1 kB is the 2 GB limit
    model = resnet()
    out, _ = apply_plan(model, Plan(remove_blocks=[analyze_model(model).residual_blocks[0].join]))
    v = verify(model, out)
    assert v.passed and v.checker == "ok" and v.provider == "cpu"
    assert v.finite and v.outputs[0].max_abs > 0  # run from disk, the pruned model still computes (another function)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(1, 3), data=st.data())
def test_a_prepared_model_rewrites_exactly_as_apply_plan_one_plan_after_another(seed, blocks, data):
    """LayerMerge applies every option to one prepared model (imported and analysed once, rewritten on a copy): the
    result equals apply_plan's byte for byte, whatever the plans before it did to their copies."""
    model = resnet(seed, blocks)
    options = [o for o in search_space(analyze_model(model), conv_l1_norms(to_graph(model))) if not o.original]
    chosen = data.draw(st.lists(st.sampled_from(options), min_size=1, max_size=6))
    prepared = prepare(model)
    for option in chosen:
        plan = Plan(**options_plan([option]))
        try:
            expected = apply_plan(model, plan)
        except PlanError as exc:
            with pytest.raises(PlanError, match=str(exc)[:40]):
                apply_prepared(prepared, plan)
            continue
        got = apply_prepared(prepared, plan)
        assert got[0].SerializeToString() == expected[0].SerializeToString() and got[1] == expected[1]
