"""verify compares numbers: finite outputs always, the original's within TOLERANCE when the rewrite claims to
preserve the function, and drift figures (top-1 agreement included) when it does not."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.graph import rewrite
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.plan import Plan, apply_plan, preserves_function
from onnxprune.verify import TOLERANCE, random_feeds, top1_agreement, verify
from tests.builders import GraphBuilder, residual_block
from tests.conftest import run


def classifier(seed=0, blocks=3):
    """conv + BN stem, identity blocks with BN, global pool, Gemm to 10 classes: an (N, 10) output."""
    g = GraphBuilder(("batch", 3, 12, 12), seed=seed)
    x = g.relu(g.bn(g.conv(g.input, 8, bias=False)))
    for _ in range(blocks):
        x = residual_block(g, x)
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    w = g.const(g.rng.normal(0, 0.3, (10, 8)).astype(np.float32))
    logits = g.node("Gemm", [x, w, g.const(g.rng.normal(0, 0.1, 10).astype(np.float32), "b")], 10, transB=1)
    return infer_shapes(g.build([logits]))


def scaled_by_zero(divisor: float):
    """conv then a division by a constant: ``divisor`` 0 makes Inf (and NaN where the conv gives 0)."""
    g = GraphBuilder(("batch", 3, 6, 6), seed=1)
    y = g.node("Div", [g.relu(g.conv(g.input, 4)), g.const(np.full((1, 4, 1, 1), divisor, np.float32), "d")])
    return g.build([y])


def normalized(model):
    """The model after normalization alone (BN folded into the convs)."""
    return to_model(rewrite.finish(to_graph(model)), model)


def with_weight(model, index, change):
    """A copy with ``change`` applied to the ``index``-th initializer of more than one element."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weight = [t for t in out.graph.initializer if np.prod(t.dims) > 1][index]
    values = numpy_helper.to_array(weight).copy()
    change(values)
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    return out


def test_inf_and_nan_in_the_rewritten_output_fail():
    original, broken = scaled_by_zero(2.0), scaled_by_zero(0.0)
    v = verify(original, broken)
    assert v.checker == "ok" and v.interface == "ok" and v.provider == "cpu"
    assert not v.passed and not v.finite
    out = v.outputs[0]
    expected = int((~np.isfinite(run(broken, random_feeds(original))[0])).sum())
    assert out.nonfinite == expected > 0 and out.original_nonfinite == 0
    assert f"{expected} of {int(np.prod(out.shape))} values NaN/Inf" in v.summary()
    assert v.to_dict()["outputs"][0]["finite"] is False and v.to_dict()["finite"] is False


def test_a_nan_weight_fails_even_without_a_function_claim():
    model = classifier()
    v = verify(model, with_weight(model, 0, lambda w: w.flat.__setitem__(0, np.nan)))
    assert not v.passed and not v.finite and v.outputs[0].nonfinite > 0
    assert "the inputs are bad" not in v.summary()


def test_non_finite_original_is_named_and_still_fails():
    model = classifier()
    feeds = random_feeds(model)
    feeds["input"][0, 0, 0, 0] = np.nan
    v = verify(model, normalized(model), feeds=feeds, preserves_function=True)
    assert not v.passed and v.outputs[0].original_nonfinite > 0
    assert "the inputs are bad, not the rewrite" in v.summary()


def test_bn_folding_passes_within_tolerance():
    model = classifier()
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    folded = normalized(model)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    v = verify(model, folded, preserves_function=True)
    assert v.passed and v.finite and v.within_tolerance and v.tolerance == TOLERANCE
    assert v.outputs[0].scaled <= TOLERANCE and v.outputs[0].within_tolerance
    assert "within tolerance" in v.summary() and "function preserved" in v.summary()
    empty, summary = apply_plan(model, Plan())
    assert not summary["changes_function"] and preserves_function(Plan(), None)
    assert verify(model, empty, preserves_function=True).within_tolerance


@pytest.mark.parametrize("factor", [1.01, 1.001])
def test_a_perturbed_weight_fails_a_function_preserving_claim(factor):
    model = classifier()
    folded = normalized(model)
    perturbed = with_weight(folded, 2, lambda w: w.__imul__(np.float32(factor)))
    v = verify(model, perturbed, preserves_function=True)
    assert v.finite and not v.within_tolerance and not v.passed
    assert v.outputs[0].scaled > TOLERANCE and "OUTSIDE tolerance" in v.summary()
    drift = verify(model, perturbed)  # the same model, claimed to change the function: finite is enough
    assert drift.passed and drift.within_tolerance is None and drift.tolerance is None


def test_agreement_is_reported_for_a_classifier_output():
    model = classifier(seed=4)
    s = analyze_model(model)
    pruned, summary = apply_plan(model, Plan(remove_blocks=[s.residual_blocks[1].join]))
    assert summary["changes_function"]
    feeds = random_feeds(model, batch=32, seed=3)
    v = verify(model, pruned, feeds=feeds)
    a, b = run(model, feeds)[0], run(pruned, feeds)[0]
    assert v.passed and v.finite and not v.identical and v.outputs[0].max_abs > 0
    assert v.agreement == v.outputs[0].top1_agreement == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert v.to_dict()["agreement"] == v.agreement
    assert f"top-1 agreement {100 * v.agreement:.1f}%" in v.summary()
    assert top1_agreement(a, a) == 1.0


def test_summary_has_one_line_per_output_and_agreement_only_for_a_2d_first_output():
    g = GraphBuilder(("batch", 3, 6, 6), seed=2)
    x = g.conv(g.input, 4)
    model = g.build([g.relu(x), g.node("Sigmoid", [x])])
    v = verify(model, model)
    lines = v.summary().splitlines()
    assert v.passed and v.identical and len([line for line in lines if line.startswith("  output ")]) == 2
    assert v.agreement is None and all(o.top1_agreement is None for o in v.outputs)


def linear_pair(second_kernel: int, activation: bool = False):
    """stem conv + relu, then a 3x3 conv and a second conv (``second_kernel``) with nothing (or a relu) between."""
    g = GraphBuilder(("batch", 4, 10, 10), seed=6)
    x = g.relu(g.conv(g.input, 8))
    y = g.conv(x, 8)
    y = g.conv(g.relu(y) if activation else y, 8, k=second_kernel)
    return infer_shapes(g.build([g.relu(y)]))


@pytest.mark.parametrize("second_kernel, activation, preserved",
                         [(1, False, True), (3, False, False), (1, True, False)])
def test_which_merges_preserve_the_function(second_kernel, activation, preserved):
    model = linear_pair(second_kernel, activation)
    s = analyze_model(model)
    plan = Plan(merge=[[s.convs[1].name, s.convs[2].name]], drop_activations=s.links[1].activation_nodes)
    assert preserves_function(plan, s) is preserved
    assert preserves_function(Plan(merge=plan.merge), s) is preserved  # an activation between is seen in the links too
    merged, summary = apply_plan(model, plan)
    assert summary["changes_function"] is not preserved
    claimed = verify(model, merged, preserves_function=True)
    assert claimed.finite and claimed.within_tolerance is preserved  # a padded merge differs in a border band
    assert verify(model, merged, preserves_function=not summary["changes_function"]).passed


@pytest.mark.parametrize("second_kernel", [1, 3])
def test_apply_holds_function_preserving_plans_to_the_tolerance(second_kernel, tmp_path):
    from onnxprune import api

    model = linear_pair(second_kernel)
    s = analyze_model(model)
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "plan.json").write_text(json.dumps({"merge": [[s.convs[1].name, s.convs[2].name]]}))
    result = api.apply(tmp_path / "model.onnx", tmp_path / "plan.json", tmp_path / "out.onnx")
    v = result.verification
    assert v.passed and v.finite and v.preserves_function is (second_kernel == 1)
    assert v.within_tolerance is (True if second_kernel == 1 else None)
    assert v.outputs[0].scaled <= TOLERANCE if second_kernel == 1 else v.outputs[0].scaled > TOLERANCE


def test_removals_and_drops_change_the_function():
    model = classifier()
    s = analyze_model(model)
    assert not preserves_function(Plan(remove_blocks=[s.residual_blocks[0].join]), s)
    assert not preserves_function(Plan(drop_activations=[s.convs[0].name]), s)
    assert not preserves_function(Plan(drop_convs=[s.convs[1].name]), s)
