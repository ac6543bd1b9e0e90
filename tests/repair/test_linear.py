"""Repair end to end: on residual networks whose removed blocks are linear (a 1x1 conv branch) the fitted
maps give the original back, whichever blocks were removed; on a shipped reference model repair brings
a pruned model closer to its original."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.data.sources import Dataset, load_data
from onnxprune.evaluate import logits_of
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes, load_model
from onnxprune.options import RepairOptions
from onnxprune.plan import Plan, apply_plan
from onnxprune.repair.linear import repair
from onnxprune.runtime.session import create_session
from tests.builders import GraphBuilder
from tests.conftest import run


def linear_residual_network(blocks: int, channels: int, relu_after_join: bool, seed: int) -> onnx.ModelProto:
    """conv 3x3 -> ``blocks`` x (x + conv1x1(x), then ReLU or not) -> conv 3x3."""
    g = GraphBuilder(("N", 3, 5, 5), seed=seed)
    x = g.relu(g.conv(g.input, channels))
    for _ in range(blocks):
        x = g.add(x, g.conv(x, channels, k=1))
        if relu_after_join:
            x = g.relu(x)
    return infer_shapes(g.build([g.conv(x, 2)]))


@settings(max_examples=12, deadline=None)
@given(blocks=st.integers(1, 5), channels=st.integers(2, 6), relu=st.booleans(), sequential=st.booleans(),
       removed=st.sets(st.integers(0, 4), min_size=1), seed=st.integers(0, 1000))
def test_repair_gives_back_a_network_whose_removed_blocks_were_linear(blocks, channels, relu, sequential, removed,
                                                                       seed):
    model = linear_residual_network(blocks, channels, relu, seed)
    joins = [b.join for b in analyze_model(model).residual_blocks]
    assert len(joins) == blocks
    plan = Plan(remove_blocks=[joins[i] for i in sorted(removed) if i < blocks] or [joins[0]])
    pruned, _ = apply_plan(model, plan)
    rng = np.random.default_rng(seed)
    data = Dataset({"input": rng.normal(size=(48, 3, 5, 5)).astype(np.float32)}, None, "test")
    result = repair(pruned, model, data, RepairOptions(ridge=0.0, sequential=sequential, batch=16))
    onnx.checker.check_model(result.model, full_check=True)
    expected_cuts = len(plan.remove_blocks) if relu else _runs(plan.remove_blocks, joins)
    assert len(result.record["maps"]) == expected_cuts
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    want, = run(model, {"input": x})
    got, = run(result.model, {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for entry in result.record["maps"]:
        assert entry["error_after"] < 1e-6


def _runs(removed: list[str], joins: list[str]) -> int:
    """Runs of consecutive removed blocks: one cut each when nothing lies between the blocks."""
    index = sorted(joins.index(j) for j in removed)
    return 1 + sum(1 for a, b in zip(index, index[1:]) if b != a + 1)


@pytest.fixture(scope="module")
def resnet20_pruned():
    model = load_model("models/resnet20.onnx")
    joins = [b.join for b in analyze_model(model).residual_blocks if b.removable]
    pruned, _ = apply_plan(model, Plan(remove_blocks=[joins[1], joins[3], joins[5]]))
    return model, pruned


@pytest.mark.parametrize("sequential", [True, False])
def test_repair_brings_a_pruned_reference_model_back_towards_its_original(resnet20_pruned, sequential):
    model, pruned = resnet20_pruned
    calib = load_data("models/cifar10_calib512.npz", model, samples=256)
    test = load_data("models/cifar10_test1000.npz", model, samples=300)
    result = repair(pruned, model, calib, RepairOptions(sequential=sequential))
    assert len(result.record["maps"]) == 3
    assert all(m["error_after"] < m["error_before"] for m in result.record["maps"])
    logits = {name: logits_of(create_session(m, "cpu"), test, 100)
              for name, m in (("original", model), ("pruned", pruned), ("repaired", result.model))}
    agree = {name: float((z.argmax(1) == logits["original"].argmax(1)).mean()) for name, z in logits.items()}
    assert agree["repaired"] > agree["pruned"] + 0.02, agree


def test_repair_on_a_post_ln_encoder_with_a_mask_fits_on_real_tokens_and_helps(exported_encoder):
    from tests import encoder

    torch_model, path = exported_encoder("torchscript")
    model = load_model(path)
    blocks = [b for b in analyze_model(model).residual_blocks if b.removable]
    pruned, _ = apply_plan(model, Plan(remove_blocks=[blocks[2].join, blocks[5].join]))
    feeds = encoder.batch(torch_model, samples=96, seed=1)
    data = Dataset(feeds, None, "test")
    result = repair(pruned, model, data, RepairOptions())
    onnx.checker.check_model(result.model, full_check=True)
    real_tokens = int((feeds["attention_mask"] != 0).sum())
    assert [m["rows"] for m in result.record["maps"]] == [real_tokens, real_tokens]
    assert all(m["placed"].startswith(("inserted", "folded")) for m in result.record["maps"])
    held = encoder.batch(torch_model, samples=16, seed=2)
    want, real = run(model, held)[0], held["attention_mask"] != 0
    error = {name: float(np.mean((run(m, held)[0] - want)[real] ** 2)) for name, m in (("pruned", pruned),
                                                                                        ("repaired", result.model))}
    assert error["repaired"] < error["pruned"], error
