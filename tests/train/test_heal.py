"""Healing (onnxprune.train.heal, the heal verb, prune --heal-data) on the shipped ResNet-20 with blocks removed."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from onnxprune.api import agreement_target
from onnxprune.cli import EXIT_TARGET_MISSED, healing_options, main, parse_args
from onnxprune.data.sources import load_data
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import load_model
from onnxprune.options import HealingOptions
from onnxprune.plan import Plan, apply_plan, load_plan, save_plan
from onnxprune.runtime.capture import pooled_feature, with_outputs
from onnxprune.runtime.session import create_session
from onnxprune.train.bridge import GraphModule
from onnxprune.train.heal import (HealLoop, augment, distillation_loss, heal, image_axes, kept_block_outputs, mixup,
                                  prepare, schedule, split_data)

ROOT = Path(__file__).resolve().parents[2]
RESNET20 = ROOT / "models" / "resnet20.onnx"
CALIB = ROOT / "models" / "cifar10_calib512.npz"


@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory):
    """(original, pruned, pruned path, plan path): the shipped ResNet-20 with its first three removable blocks gone."""
    folder = tmp_path_factory.mktemp("heal")
    original = load_model(RESNET20)
    joins = [b.join for b in analyze_model(original).residual_blocks if b.removable][:3]
    plan = Plan(remove_blocks=joins, method="slp")
    pruned, _ = apply_plan(original, plan)
    onnx.save(pruned, folder / "pruned.onnx")
    save_plan(plan, folder / "pruned.plan.json")
    return original, pruned, folder / "pruned.onnx", folder / "pruned.plan.json"


@given(st.integers(2, 500), st.floats(0.01, 0.9), st.integers(0, 5))
def test_split_is_a_seeded_partition(n, holdout, seed):
    split = split_data(n, holdout, seed)
    both = np.concatenate([split.train, split.held_back])
    assert sorted(both.tolist()) == list(range(n)) and len(split.train) >= 1 and len(split.held_back) >= 1
    assert np.array_equal(split_data(n, holdout, seed).held_back, split.held_back)


def test_schedule_warms_up_then_decays_to_zero():
    values = [schedule(s, 1000) for s in range(1000)]
    peak = int(np.argmax(values))
    assert values[0] < values[peak] == pytest.approx(1.0) and 0 < peak <= 100
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:])) and values[-1] < 1e-4


def test_augment_crops_and_flips_images_only():
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    assert image_axes(nchw) == (2, 3) and image_axes(nchw.transpose(0, 2, 3, 1)) == (1, 2)
    assert image_axes(np.zeros((4, 10), np.float32)) is None and image_axes(nchw.astype(np.int64)) is None
    out = augment(nchw, (2, 3), rng)
    assert out.shape == nchw.shape and out.dtype == nchw.dtype and not np.array_equal(out, nchw)
    # every output row is a shifted (and maybe mirrored) window of its own image: its values come from it
    for a, b in zip(out, nchw):
        values = set(np.round(b.ravel(), 5)) | {0.0}
        assert set(np.round(a.ravel(), 5)) <= values


def test_mixup_blends_each_sample_with_another_of_the_batch():
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    mixed = mixup(batch, rng)
    assert mixed.shape == batch.shape and mixed.dtype == batch.dtype
    low, high = batch.min(axis=0), batch.max(axis=0)
    assert np.all(mixed >= low - 1e-6) and np.all(mixed <= high + 1e-6)  # a convex blend of two samples
    assert not np.allclose(mixed, batch)


def test_mixup_is_on_for_small_data_sets_unless_told(pruned_pair, monkeypatch):
    original = pruned_pair[0]
    data = load_data(str(CALIB), original, samples=64)  # 57 samples to train on
    output = original.graph.output[0].name
    teacher = create_session(with_outputs(original, [output]), "cpu")

    def blends(**fields) -> bool:
        options = HealingOptions(use_labels=False, **fields)
        return prepare(original, teacher, data, options, [output], [output]).blend

    assert blends() and blends(mixup=True) and not blends(mixup=False)
    monkeypatch.setattr(HealingOptions, "MIXUP_BELOW", 57)  # now a large data set: off unless asked for
    assert not blends() and blends(mixup=True) and not blends(mixup=False)
    assert HealingOptions().blends(HealingOptions.MIXUP_BELOW - 1) and not HealingOptions().blends(10 ** 6)


def test_a_heal_step_lowers_the_loss_on_a_fixed_batch(pruned_pair):
    original, pruned, _, _ = pruned_pair
    data = load_data(str(CALIB), original, samples=32)
    x = data.inputs["input"]
    s_out = [pruned.graph.output[0].name, pooled_feature(pruned)]
    t_out = [original.graph.output[0].name, pooled_feature(original)]
    teacher = [torch.from_numpy(t) for t in create_session(with_outputs(original, t_out), "cpu").run({"input": x}, t_out)]
    student = GraphModule(pruned, s_out)
    options = HealingOptions()
    scale = float(teacher[1].square().mean())
    optimizer = torch.optim.AdamW(student.parameters(), lr=options.lr)
    losses = []
    for _ in range(8):
        loss = distillation_loss(student({"input": torch.from_numpy(x)}), teacher, scale, options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_heal_keeps_the_graph_and_does_not_lose_agreement(pruned_pair):
    original, pruned, _, _ = pruned_pair
    data = load_data(str(CALIB), original, samples=160)
    result = heal(pruned, original, data, HealingOptions(steps=40, batch=32, evaluations=4, use_labels=False), "cpu")
    healed, record = result.model, result.record
    # same graph, same names, same metadata: only initializer values may change
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in healed.graph.node] == \
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in pruned.graph.node]
    assert [t.name for t in healed.graph.initializer] == [t.name for t in pruned.graph.initializer]
    assert healed.metadata_props == pruned.metadata_props
    onnx.checker.check_model(healed, full_check=True)
    assert record["held_back_kl_after"] <= record["held_back_kl_before"]  # the kept checkpoint is the closest
    assert record["steps"] == 40 and record["train_samples"] + record["held_back_samples"] == 160
    assert record["feature_tensor"] == pooled_feature(pruned) and not record["labels"] and record["augment"]
    assert record["mixup"]  # label-free: blends are labelled by the teacher
    if record["best_step"]:
        changed = [a.name for a, b in zip(healed.graph.initializer, pruned.graph.initializer) if a != b]
        assert changed


def test_kept_block_outputs_are_the_blocks_the_pruning_left(pruned_pair):
    original, pruned, _, _ = pruned_pair
    blocks = analyze_model(original).residual_blocks
    gone = [b.output for b in blocks if b.removable][:3]  # the fixture removed the first three removable blocks
    kept = kept_block_outputs(pruned, original)
    assert kept == [b.output for b in blocks if b.output not in gone] and len(kept) == len(blocks) - 3
    assert kept_block_outputs(original, original) == [b.output for b in blocks]


def test_heal_with_block_outputs_matched_lowers_their_error(pruned_pair):
    original, pruned, _, _ = pruned_pair
    data = load_data(str(CALIB), original, samples=96)
    options = HealingOptions(steps=60, batch=32, evaluations=3, use_labels=False, match_blocks=True, mixup=False)
    result = heal(pruned, original, data, options, "cpu")
    matched = result.record["matched_block_outputs"]
    assert matched == kept_block_outputs(pruned, original)
    onnx.checker.check_model(result.model, full_check=True)

    def block_error(model):  # relative MSE at the matched block outputs, on the held-back samples
        x = data.inputs["input"][result.split.held_back]
        got = create_session(with_outputs(model, matched), "cpu").run({"input": x}, matched)
        want = create_session(with_outputs(original, matched), "cpu").run({"input": x}, matched)
        return np.mean([np.mean((g - w) ** 2) / np.mean(w ** 2) for g, w in zip(got, want)])

    assert result.record["best_step"] > 0 and block_error(result.model) < 0.8 * block_error(pruned)


def test_the_moving_average_of_the_weights_follows_its_decay():
    net = torch.nn.Linear(3, 2)
    loop = HealLoop(net, SimpleNamespace(steps=10), HealingOptions(ema=0.5), torch.device("cpu"))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    loop.average = {k: v.clone() for k, v in start.items()}
    expected = {k: v.clone() for k, v in start.items()}
    for n in range(1, 4):
        with torch.no_grad():
            net.weight.add_(1.0)
        loop.update_average()
        decay = min(0.5, (1 + n) / (10 + n))
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in net.state_dict().items()}
    assert all(torch.allclose(loop.average[k], expected[k]) for k in expected)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    with loop.weights_to_keep():  # the average stands in for the weights, which come back after
        assert torch.allclose(net.weight, expected["weight"])
    assert torch.equal(net.weight, own["weight"])
    with pytest.raises(OnnxPruneError, match="moving average"):
        HealingOptions(ema=1.0)


def test_heal_verb_writes_the_model_and_its_plan(pruned_pair, tmp_path, capsys):
    _, pruned, pruned_path, plan_path = pruned_pair
    out = tmp_path / "healed.onnx"
    code = main(["heal", str(pruned_path), "--teacher", str(RESNET20), "--data", str(CALIB), "--samples", "128",
                 "--steps", "12", "--heal-batch", "16", "--label-free", "--ema", "0.9", "-o", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and out.exists() and result["verification"]["passed"]
    assert result["before_pruning"]["agreement"] == 1.0 and "accuracy" in result["after_healing"]
    assert result["held_back_samples"] == 13 and result["healing"]["steps"] == 12
    plan = load_plan(tmp_path / "healed.plan.json")
    assert plan.remove_blocks == load_plan(plan_path).remove_blocks  # the pruned model's plan, carried over
    assert plan.healing["steps"] == 12 and len(plan.healing["history"]) >= 2 and plan.healing["ema"] == 0.9
    # --min-agreement above what the model reaches: written, status 4
    code = main(["heal", str(pruned_path), "--teacher", str(RESNET20), "--data", str(CALIB), "--samples", "64",
                 "--steps", "2", "--heal-batch", "16", "--min-agreement", "1.0", "--holdout", "0.5",
                 "-o", str(tmp_path / "b.onnx")])
    err = capsys.readouterr().err
    agreement = load_plan(tmp_path / "b.plan.json").healing["held_back_agreement_after"]
    assert code == (0 if agreement >= 1.0 else EXIT_TARGET_MISSED) and (tmp_path / "b.onnx").exists()
    assert (code == 0) or "min-agreement" in err


def test_agreement_target():
    stages = {"after_healing": {"agreement": 0.9}}
    assert agreement_target(stages, HealingOptions())["target_met"]
    assert agreement_target(stages, HealingOptions(min_agreement=0.9))["target_met"]
    missed = agreement_target(stages, HealingOptions(min_agreement=0.95))
    assert not missed["target_met"] and "90.0%" in missed["message"]


def test_heal_refusals(pruned_pair, tmp_path, capsys):
    _, _, pruned_path, _ = pruned_pair
    base = ["heal", str(pruned_path), "--teacher", str(RESNET20), "-o", str(tmp_path / "h.onnx")]
    assert main(base + ["--data", "random"]) == 2
    assert "real data" in capsys.readouterr().err
    assert main(base + ["--data", str(CALIB), "--steps", "1", "--feature-tensor", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["heal", str(pruned_path), "--teacher", str(RESNET20), "-o", str(pruned_path), "--data", str(CALIB)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["prune", str(RESNET20), "--remove-blocks", "1", "--data", str(CALIB), "--samples", "32",
                 "--min-agreement", "0.5", "-o", str(tmp_path / "p.onnx")]) == 2
    assert "needs --heal-data" in capsys.readouterr().err


def test_prune_with_heal_data_reports_three_stages(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    code = main(["prune", str(RESNET20), "--remove-blocks", "2", "--data", str(CALIB), "--samples", "64",
                 "--heal-data", str(CALIB), "--heal-steps", "6", "--heal-batch", "16", "--label-free",
                 "--min-agreement", "0", "-o", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["target_met"]
    assert {"before_pruning", "after_pruning", "after_healing"} <= set(result)
    assert result["after_pruning"]["agreement"] <= 1.0 and "accuracy" in result["before_pruning"]
    assert load_plan(tmp_path / "p.plan.json").healing["steps"] == 6
    assert result["healed_verification"]["passed"]


def test_heal_flags_epochs_no_augment_no_mixup(pruned_pair, tmp_path, capsys):
    _, _, pruned_path, _ = pruned_pair
    code = main(["heal", str(pruned_path), "--teacher", str(RESNET20), "--data", str(CALIB), "--samples", "64",
                 "--epochs", "0.5", "--heal-batch", "16", "--no-augment", "--no-mixup", "--label-free",
                 "-o", str(tmp_path / "e.onnx"), "--json"])
    healing = json.loads(capsys.readouterr().out)["healing"]
    assert code == 0 and healing["steps"] == 2  # ceil(0.5 x 58 training samples / 16)
    assert not healing["augment"] and not healing["mixup"] and not healing["labels"]


def test_labels_outside_the_models_classes_and_outputs_of_other_shapes_are_refused():
    """Found by tests/test_fuzz.py: cross-entropy on a label the logits lack, a loss broadcast over unlike shapes."""
    from onnxprune.errors import OnnxPruneError
    from onnxprune.train.heal import check_labels

    g_model = onnx.helper.make_model(onnx.helper.make_graph(
        [], "g", [], [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])]))
    check_labels(np.array([0, 9]), g_model)
    check_labels(None, g_model)
    for labels in (np.array([0, 10]), np.array([-1, 3])):
        with pytest.raises(OnnxPruneError, match="classes are 0 to 9"):
            check_labels(labels, g_model)
    with pytest.raises(OnnxPruneError, match="feature map has shape"):
        distillation_loss([torch.zeros(2, 10), torch.zeros(2, 4, 3, 3)], [torch.zeros(2, 10), torch.zeros(2, 4, 2, 2)],
                          1.0, HealingOptions())


def test_healing_flags_reach_the_options():
    heal_args = parse_args(["heal", "p.onnx", "--teacher", "m.onnx", "--data", "d.npz", "-o", "h.onnx",
                            "--match-blocks", "--ema", "0.99"])
    assert healing_options(heal_args) == HealingOptions(match_blocks=True, ema=0.99)
    prune_args = parse_args(["prune", "m.onnx", "--data", "d.npz", "--speedup", "1.5", "-o", "p.onnx",
                             "--heal-data", "d.npz", "--heal-match-blocks", "--heal-ema", "0.995"])
    options = healing_options(prune_args)
    assert options.match_blocks and options.ema == 0.995
    assert not healing_options(parse_args(["heal", "p.onnx", "--teacher", "m.onnx", "--data", "d.npz",
                                           "-o", "h.onnx"])).match_blocks
    heal = ["heal", "p.onnx", "--teacher", "m.onnx", "--data", "d.npz", "-o", "h.onnx"]
    assert [healing_options(parse_args(heal + flags)).mixup for flags in ([], ["--mixup"], ["--no-mixup"])] == \
        [None, True, False]
    with pytest.raises(SystemExit):
        parse_args(heal + ["--mixup", "--no-mixup"])
