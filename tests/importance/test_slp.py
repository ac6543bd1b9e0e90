import logging

import numpy as np
import pytest
from onnx import numpy_helper

from onnxprune.data.sources import load_data
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes, load_model
from onnxprune.importance.slp import prune_slp, removal_candidates, score_blocks
from onnxprune.options import ScoringOptions, TargetOptions
from onnxprune.plan import apply_plan
from onnxprune.runtime.capture import feature_tensor
from onnxprune.verify import random_feeds, verify
from tests.builders import GraphBuilder, residual_block
from tests.conftest import run

CPU = ScoringOptions(provider="cpu")


def classifier(seed=0, tiny_block=None, blocks=4):
    """stem, ``blocks`` identity blocks, a projection block, one more, GAP, Flatten, Gemm."""
    g = GraphBuilder(("batch", 3, 12, 12), seed=seed)
    x = g.relu(g.conv(g.input, 8))
    for k in range(blocks):
        before = len(g.initializers)
        x = residual_block(g, x)
        if k == tiny_block:  # scale the last BN's gamma and beta down: the branch contributes ~nothing
            for i in (before + 6, before + 7):  # [w1, bn1 x4, w2, bn2 gamma, beta, mean, var]
                t = g.initializers[i]
                g.initializers[i] = numpy_helper.from_array(numpy_helper.to_array(t) * 1e-4, t.name)
    x = residual_block(g, residual_block(g, x, projection=True, stride=2, cout=16))
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], 16)
    w = g.const(g.rng.normal(size=(10, 16)).astype(np.float32))
    logits = g.node("Gemm", [pooled, w, g.const(np.zeros(10, np.float32))], 10, transB=1)
    return infer_shapes(g.build([logits]))


def test_feature_tensor_is_the_classifier_input():
    model = classifier()
    name = feature_tensor(model)
    assert next(n for n in model.graph.node if name in n.output).op_type == "Flatten"


def test_suffix_only_scores_equal_whole_network_scores():
    model = classifier(seed=1)
    data = load_data("random", model, samples=48, seed=1)
    blocks = removal_candidates(analyze_model(model), min_blocks_per_stage=0)
    feature = feature_tensor(model)
    fast = score_blocks(model, data, blocks, feature, "cpu", batch=16)
    slow = score_blocks(model, data, blocks, feature, "cpu", batch=16, suffix_only=False)
    assert [s.join for s in fast.scores] == [s.join for s in slow.scores]
    np.testing.assert_allclose([s.score for s in fast.scores], [s.score for s in slow.scores], atol=1e-6)
    assert all(0 <= s.score <= 1 for s in fast.scores) and fast.provider == "cpu"


def test_a_block_that_does_nothing_scores_lowest_and_goes_first():
    model = classifier(seed=2, tiny_block=2)
    data = load_data("random", model, samples=32, seed=0)
    s = analyze_model(model)
    run = score_blocks(model, data, removal_candidates(s, 0), feature_tensor(model), "cpu")
    lowest = min(run.scores, key=lambda b: b.score)
    assert lowest.join == s.residual_blocks[2].join and lowest.score < 1e-4
    result = prune_slp(model, data, feature_tensor(model), TargetOptions(remove_blocks=1), CPU)
    assert result.plan.remove_blocks == [s.residual_blocks[2].join]


@pytest.mark.parametrize("one_shot", [False, True])
def test_iterative_pruning_meets_the_target_and_verifies(one_shot, caplog):
    model = classifier(seed=3)
    data = load_data("random", model, samples=32)
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        result = prune_slp(model, data, feature_tensor(model), TargetOptions(remove_blocks=3, one_shot=one_shot), CPU)
    assert len(result.plan.remove_blocks) == 3 and result.target_met
    assert sum("slp: removed" in r.getMessage() for r in caplog.records) == 3
    replay, _ = apply_plan(model, result.plan)  # the plan replays on the original model
    v = verify(model, replay)
    assert v.passed
    assert v.finite and not v.identical  # three blocks fewer: another function, and finite
    feeds = random_feeds(model)
    assert np.array_equal(run(replay, feeds)[0], run(result.model, feeds)[0])  # the same numbers as the pruned model
    assert analyze_model(infer_shapes(replay)).macs == result.plan.predicted["macs_after"]


def test_macs_reduction_and_min_blocks_per_stage():
    model = classifier(seed=4)
    data = load_data("random", model, samples=16)
    result = prune_slp(model, data, feature_tensor(model), TargetOptions(macs_reduction=0.2), CPU)
    assert result.history[-1]["macs_reduction"] >= 0.2 and result.target_met
    # stage of 4 identity blocks + stem-shaped stage; K = 4 leaves nothing removable there
    capped = prune_slp(model, data, feature_tensor(model), TargetOptions(remove_blocks=10, min_blocks_per_stage=4), CPU)
    assert not capped.target_met and "stage" in capped.message
    with pytest.raises(OnnxPruneError, match="exactly one stop criterion"):
        prune_slp(model, data, feature_tensor(model), TargetOptions(), CPU)


def test_scoring_a_dynamo_vit_with_shape_side_inputs(exported):
    model = load_model(exported("vit_b_16", "dynamo"))
    data = load_data("random", model, samples=8)
    s = analyze_model(model)
    blocks = removal_candidates(s, 0)[:3]
    feature = feature_tensor(model)
    fast = score_blocks(model, data, blocks, feature, "cpu", batch=4)
    slow = score_blocks(model, data, blocks, feature, "cpu", batch=4, suffix_only=False)
    np.testing.assert_allclose([x.score for x in fast.scores], [x.score for x in slow.scores], atol=1e-6)


def test_l1_baseline_ranks_the_tiny_block_lowest():
    from onnxprune.importance.baselines import l1_norms, random_order

    model = classifier(seed=2, tiny_block=2)
    blocks = removal_candidates(analyze_model(model), 0)
    norms = l1_norms(model, blocks)
    assert min(norms, key=norms.get) == blocks[2].join and all(v > 0 for v in norms.values())
    assert sorted(random_order(blocks, 0)) == sorted(b.join for b in blocks)
    assert random_order(blocks, 0) == random_order(blocks, 0) != random_order(blocks, 1)


def test_capture_batch_keeps_one_batch_of_captured_tensors_within_budget():
    from onnxprune.runtime.capture import capture_batch

    model = classifier()
    blocks = removal_candidates(analyze_model(model), 0)
    names = [b.input for b in blocks]
    per_sample = sum(4 * int(np.prod(b.input_shape[1:])) for b in blocks)  # float32 bytes of one sample
    assert capture_batch(model, names, 64) == 64
    assert capture_batch(model, names, 64, budget_bytes=10 * per_sample) == 10
    assert capture_batch(model, names, 64, budget_bytes=1) == 1


def test_a_measured_stop_criterion_is_asked_once_per_removal():
    model = classifier(seed=8)
    data = load_data("random", model, samples=16)
    calls = []

    def until(current):
        calls.append(len(analyze_model(current).residual_blocks))
        return len(calls) == 2  # "fast enough" after the second removal

    result = prune_slp(model, data, feature_tensor(model), TargetOptions(), CPU, until=until)
    assert len(result.plan.remove_blocks) == 2 and result.target_met
    assert len(calls) == 2  # no second look after the loop: the answer that stopped it is the one reported


def test_scoring_and_pruning_an_encoder_from_token_arrays(exported_encoder, tmp_path):
    """An .npz of input_ids and attention_mask; suffixes read the mask's bias as a side input, and score what
    the whole network without the block scores. The pruned encoder is the torch one without those sublayers."""
    from tests import encoder

    torch_model, path = exported_encoder("torchscript")
    model = load_model(path)
    np.savez(tmp_path / "tokens.npz", **encoder.batch(torch_model, samples=24, seed=1))
    data = load_data(tmp_path / "tokens.npz", model)
    blocks = removal_candidates(analyze_model(model), 0)
    assert len(blocks) == 8
    fast = score_blocks(model, data, blocks, feature_tensor(model), "cpu", batch=10)
    slow = score_blocks(model, data, blocks, feature_tensor(model), "cpu", batch=10, suffix_only=False)
    np.testing.assert_allclose([x.score for x in fast.scores], [x.score for x in slow.scores], atol=1e-6)
    assert all(0 < x.score < 1 for x in fast.scores)
    result = prune_slp(model, data, feature_tensor(model), TargetOptions(remove_blocks=2), CPU)
    assert len(result.plan.remove_blocks) == 2 and result.target_met
    index = {b.join: b.index for b in blocks}
    skip: dict[int, tuple[str, ...]] = {}
    for join in result.plan.remove_blocks:
        skip[index[join] // 2] = skip.get(index[join] // 2, ()) + (("attention", "mlp")[index[join] % 2],)
    feeds = encoder.batch(torch_model, samples=4, seed=2)
    np.testing.assert_allclose(run(result.model, feeds)[0], encoder.torch_output(torch_model, feeds, skip), atol=1e-4)
