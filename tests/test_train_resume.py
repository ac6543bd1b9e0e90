"""models/train.py resumes from the shipped ONNX files (issue 17): the weights load back into the torch
definitions exactly, and a resumed run records its epochs in the metadata and keeps everything else."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import run

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models import definitions, train  # noqa: E402

SHIPPED = ROOT / "models" / "resnet20.onnx"
CALIB, TEST = ROOT / "models" / "cifar10_calib512.npz", ROOT / "models" / "cifar10_test1000.npz"


def _logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_module_path_undoes_the_exporters_scope_names():
    assert train.module_path("/layers/layers.3/shortcut/shortcut.0/Conv") == "layers.3.shortcut.0"
    assert train.module_path("/features/features.10/conv/conv.3/Conv") == "features.10.conv.3"
    assert train.module_path("/fc/Gemm") == "fc"


def test_shipped_resnet20_loads_into_its_definition_and_recalibration_keeps_the_function():
    proto = onnx.load(str(SHIPPED))
    model = definitions.resnet20()
    train.load_onnx_weights(model, proto)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref = run(str(SHIPPED), {"input": x})[0]
    np.testing.assert_allclose(_logits(model, x), ref, atol=1e-4)
    images, _ = train.load_npz(CALIB)
    train.recalibrate(model, [train.to_input(torch.from_numpy(images[:128]), channels_last=False)])
    np.testing.assert_allclose(_logits(model, x), ref, atol=1e-4)
    # on the calibration images themselves, batch statistics are the running ones: train mode = eval mode
    inputs = train.to_input(torch.from_numpy(images[:128]), channels_last=False)
    with torch.no_grad():
        np.testing.assert_allclose(model.train()(inputs).numpy(), model.eval()(inputs).numpy(), rtol=1e-4, atol=1e-3)


def test_training_batches_are_spread_shuffled_augmented_and_seeded():
    """The split is sorted by class: each image here is one flat colour, its class's, so the centre pixel (never
    cropped away) names the class; the 4-pixel crop shifts zero padding in, Cutout zeroes normalised pixels."""
    colours = torch.arange(10, dtype=torch.uint8).mul(20).add(30).repeat_interleave(20)
    x = colours.view(200, 1, 1, 1).expand(200, 32, 32, 3).contiguous()
    batches = list(train.training_batches(x, 100, 25, 0, seed=3, channels_last=False))
    assert [tuple(b.shape) for b in batches] == [(25, 3, 32, 32)] * 4
    centre = torch.cat([b[:, 0, 16, 16] for b in batches])
    plain = train.to_input(train.spread(x, 100), channels_last=False)[:, 0, 16, 16]
    assert sorted(centre.tolist()) == pytest.approx(sorted(plain.tolist()))  # the 100 spread images, each once
    assert len(set(batches[0][:, 0, 16, 16].tolist())) > 1  # batches mix the classes
    flat = torch.stack([(b == b[:, :, 16:17, 16:17]).all(dim=(1, 2, 3)) for b in batches]).flatten()
    assert int(flat.sum()) < 10  # the crop shifts zero padding into almost every image (1 in 81 stays whole)
    cut = torch.cat(list(train.training_batches(x, 100, 25, 8, seed=3, channels_last=False)))
    assert ((cut == 0).flatten(1).any(1)).all()  # a Cutout square in every image
    again = torch.cat(list(train.training_batches(x, 100, 25, 8, seed=3, channels_last=False)))
    other = torch.cat(list(train.training_batches(x, 100, 25, 8, seed=4, channels_last=False)))
    assert torch.equal(cut, again) and not torch.equal(cut, other)


def test_recalibrating_on_training_batches_keeps_the_training_mode_loss():
    """Training-mode BN normalises with the statistics of training batches (augmented, with Cutout for the shipped
    ResNet-20); recalibrated on such batches, the resumed network's training loss is its eval-mode loss, so
    training resumes from the network it loaded rather than first relearning its BN scales."""
    proto = onnx.load(str(SHIPPED))
    images, labels = train.load_npz(CALIB)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    fresh = list(train.training_batches(x, len(x), 128, 16, seed=1, channels_last=False))
    targets = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]  # training_batches' order

    def losses(calibration) -> tuple[float, float]:
        model = definitions.resnet20()
        train.load_onnx_weights(model, proto)
        train.recalibrate(model, calibration)
        out = {}
        with torch.no_grad():
            for mode in ("eval", "train"):
                model.train(mode == "train")
                logits = torch.cat([model(b) for b in fresh])
                out[mode] = float(torch.nn.functional.cross_entropy(logits, targets))
        return out["eval"], out["train"]

    evaluated, trained = losses(train.training_batches(x, len(x), 256, 16, seed=2, channels_last=False))
    assert trained == pytest.approx(evaluated, rel=0.25)
    _, trained_on_plain = losses([train.to_input(x[i : i + 256], channels_last=False) for i in range(0, len(x), 256)])
    assert trained_on_plain > 1.5 * trained


def test_recorded_weight_norms_give_back_each_convolution_up_to_its_bn_scales_sign(tmp_path):
    """Folding loses each convolution's scale; the export records its per-channel norms, and recalibration scales each
    channel back to them: the weight comes back as it was (negated where the BN scale was negative, which changes
    neither the function nor the training dynamics), so its effective learning rate is kept."""
    torch.manual_seed(0)
    trained = definitions.resnet20()
    with torch.no_grad():
        for _, conv, bn in train.conv_bn_pairs(trained):  # scales and statistics far from a fresh network's
            conv.weight.mul_(torch.rand(conv.out_channels, 1, 1, 1) * 3 + 0.1)
            bn.weight.copy_(torch.randn(bn.num_features))
            bn.bias.copy_(torch.randn(bn.num_features) * 0.1)
            bn.running_mean.copy_(torch.randn(bn.num_features) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
    norms = train.weight_norms(trained)
    path = tmp_path / "resnet20.onnx"
    train.export(trained, path, {**train.default_metadata(), train.NORMS_KEY: json.dumps(norms)})
    proto = onnx.load(str(path))
    images = torch.from_numpy(train.load_npz(CALIB)[0][:128])
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    for recorded in (train.read_weight_norms(proto, definitions.resnet20()), None):
        model = definitions.resnet20()
        train.load_onnx_weights(model, proto)
        train.recalibrate(model, train.training_batches(images, 128, 64, 8, seed=0, channels_last=False), recorded)
        np.testing.assert_allclose(_logits(model, x), run(str(path), {"input": x})[0], rtol=1e-3, atol=1e-3)
        for (name, conv, bn), (_, original, original_bn) in zip(train.conv_bn_pairs(model),
                                                                 train.conv_bn_pairs(trained)):
            sign = torch.sign(original_bn.weight).view(-1, 1, 1, 1)
            if recorded:
                torch.testing.assert_close(conv.weight, sign * original.weight, rtol=1e-4, atol=1e-6, msg=name)
            else:  # unit-variance outputs: the recorded norms are not what comes back
                assert not torch.allclose(conv.weight, sign * original.weight, rtol=0.05), name
    with pytest.raises(ValueError, match="does not match"):
        train.read_weight_norms(proto, definitions.resnet56())


def test_schedule_continues_an_unfinished_cycle_and_doubles_a_finished_one():
    record = train.legacy_record("resnet20")
    cycle, new = train.plan_cycle(record, None, lr=0.1, warmup=1.0, batch=128)
    assert new and cycle["index"] == 1 and cycle["length"] == 60 and cycle["done"] == 0
    record["cycle"] = dict(cycle, done=10)
    again, new = train.plan_cycle(record, 5, lr=0.5, warmup=2.0, batch=512)
    assert not new and again["length"] == 60 and again["lr"] == 0.1 and again["done"] == 10
    assert train.lr_at(cycle, 0.5) == pytest.approx(0.05) and train.lr_at(cycle, 60) == pytest.approx(0.0)
    assert train.fit_cycle({"done": 2}, epoch_seconds=2.0, seconds_left=100.0, cap=200) == 52


def test_a_cycle_fitted_after_a_slow_first_epoch_is_refitted_longer_from_the_fastest_epoch():
    cycle = {"done": 1, "length": 200}
    first = train.refit(cycle, [100.0], fit_after=1, seconds_left=3000.0, cap=200, fitted=False, averaging=False)
    assert first == 1 + int(3000.0 // 103.0)  # from the first epoch, slowed by other work: 30 epochs
    cycle = {"done": 2, "length": first}
    second = train.refit(cycle, [100.0, 50.0], fit_after=1, seconds_left=2950.0, cap=200, fitted=True,
                         averaging=False)
    assert second == 2 + int(2950.0 // 51.5)  # from the fastest epoch so far: 59
    cycle["length"], cycle["done"] = second, 3
    # a slower third epoch never shortens it; after REFITS timed epochs, or once averaging has begun, no refit
    assert train.refit(cycle, [100.0, 50.0, 90.0], 1, 2860.0, 200, True, False) is None
    assert train.refit({"done": 4, "length": 30}, [100.0, 100.0, 100.0, 10.0], 1, 2000.0, 200, True, False) is None
    assert train.refit({"done": 2, "length": 30}, [100.0, 10.0], 1, 2900.0, 200, True, True) is None
    # the epochs before fit_after (the warm-up, torch.compile's compilation) are not timed
    assert train.refit({"done": 1, "length": 200}, [5.0], 2, 3000.0, 200, False, False) is None
    assert train.refit({"done": 2, "length": 200}, [5.0, 100.0], 2, 3000.0, 200, False, False) == 2 + 29


def _resume(init: Path, out: Path, *extra: str) -> dict:
    return train.main(["resnet20", "--init", str(init), "--out", str(out), "--log-dir", str(out),
                       "--train-npz", str(CALIB), "--test-npz", str(TEST), "--limit-train", "64", "--limit-test", "64",
                       "--batch", "32", "--calib-images", "64", "--threads", "1", *extra])


def test_a_resumed_run_records_its_epochs_and_keeps_the_other_metadata(tmp_path):
    shipped = onnx.load(str(SHIPPED))
    before = train.read_record(shipped, "resnet20")  # the shipped record, or the legacy one of a file without it
    assert before["cycle"]["done"] == before["cycle"]["length"]  # the shipped model ends a cycle
    first = _resume(SHIPPED, tmp_path, "--epochs", "1", "--cycle", "2", "--cutout", "8")
    written = onnx.load(str(tmp_path / "resnet20.onnx"))
    meta = {e.key: e.value for e in written.metadata_props}
    assert json.loads(meta[train.TRAINING_KEY]) == first
    for entry in shipped.metadata_props:
        if entry.key not in (train.TRAINING_KEY, train.NORMS_KEY):
            assert meta[entry.key] == entry.value  # preprocess and labels unchanged
    assert first["epochs"] == before["epochs"] + 1
    # a new cycle at batch 32: lr 0.1 x sqrt(32 / 128)
    assert first["cycle"] == {"index": before["cycle"]["index"] + 1, "length": 2, "done": 1, "lr": 0.05,
                              "warmup": 1.0, "batch": 32}
    assert first["history"][:-1] == before["history"]
    assert first["history"][-1]["from"] == before["epochs"] and first["history"][-1]["to"] == before["epochs"] + 1
    assert [i.name for i in written.graph.input] == ["input"] and [o.name for o in written.graph.output] == ["logits"]
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [n.name for n in written.graph.node] == [n.name for n in shipped.graph.node]

    second = _resume(tmp_path / "resnet20.onnx", tmp_path)  # continues the unfinished cycle to its end
    assert second["epochs"] == before["epochs"] + 2 and second["cycle"]["done"] == second["cycle"]["length"] == 2
    assert len(second["history"]) == len(first["history"]) + 1
    assert (first["history"][-1]["cutout"], second["history"][-1]["cutout"]) == (8, 0)  # each run records its own
    shipped_norms = train.read_weight_norms(shipped, definitions.resnet20())  # None in a file exported before them
    assert first["history"][-1]["bn_split"] == ("recorded norms" if shipped_norms else "unit variance")
    assert second["history"][-1]["bn_split"] == "recorded norms"  # the first run's export recorded them
    written_norms = train.read_weight_norms(onnx.load(str(tmp_path / "resnet20.onnx")), definitions.resnet20())
    assert all(v > 0 for values in written_norms.values() for v in values)


def test_a_vit_export_loads_back_into_its_definition(tmp_path):
    """The ViT has no BatchNorm: its weights come back by name, the Linear weights through their MatMul nodes."""
    torch.manual_seed(0)
    trained = definitions.vit()
    path = tmp_path / "vit.onnx"
    train.export(trained, path, train.default_metadata())
    loaded = definitions.vit()
    train.load_plain_weights(loaded, onnx.load(str(path)))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_logits(loaded, x), run(str(path), {"input": x})[0], atol=1e-4)


def test_the_shipped_vit_resumes_and_has_twelve_removable_blocks():
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.graph.io import load_model

    path = ROOT / "models" / "vit.onnx"
    blocks = analyze_model(load_model(str(path))).residual_blocks
    assert len(blocks) == 12 and all(b.removable and b.shortcut == "identity" for b in blocks)
    model = definitions.vit()
    train.load_plain_weights(model, onnx.load(str(path)))
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_logits(model, x), run(str(path), {"input": x})[0], atol=1e-4)
    record = train.read_record(onnx.load(str(path)), "vit")
    assert record["optimizer"]["name"] == "adamw" and record["cycle"]["done"] == record["cycle"]["length"]
