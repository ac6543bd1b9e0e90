"""Stochastic weight averaging in models/train.py (Izmailov et al. 2018; issue 17): the lr schedule of an SWA
cycle, the running average of the weights, the BatchNorm statistics measured again for the averaged weights, and a
run that writes the averaged model with its record."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import run

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models import definitions, train  # noqa: E402

SHIPPED = ROOT / "models" / "resnet20.onnx"
CALIB, TEST = ROOT / "models" / "cifar10_calib512.npz", ROOT / "models" / "cifar10_test1000.npz"


@settings(max_examples=60, deadline=None)
@given(length=st.integers(4, 300), start=st.floats(0.05, 0.95), peak=st.floats(0.01, 0.2),
       floor_fraction=st.floats(0.0, 1.0))
def test_an_swa_cycle_warms_up_decays_to_its_floor_and_stays_there(length, start, peak, floor_fraction):
    floor = peak * floor_fraction
    cycle = {"warmup": 1.0, "length": length, "lr": peak, "swa_lr": floor, "swa_start": start}
    begin = train.averaging_start(cycle)
    assert begin == pytest.approx(length * start)
    assert train.lr_at(cycle, 0.5) == pytest.approx(peak / 2)
    positions = np.linspace(1.0, max(1.0, begin), 50)
    rates = [train.lr_at(cycle, p) for p in positions]
    assert all(a >= b - 1e-12 for a, b in zip(rates, rates[1:]))  # non-increasing down to the averaging start
    assert all(floor - 1e-12 <= r <= peak + 1e-12 for r in rates)
    for p in np.linspace(max(1.0, begin), length, 20):
        assert train.lr_at(cycle, p) == pytest.approx(floor)


def test_a_cycle_without_swa_keeps_its_cosine_to_zero():
    cycle = {"warmup": 1.0, "length": 60, "lr": 0.1}
    assert train.averaging_start(cycle) == 60
    assert train.lr_at(cycle, 30.5) == pytest.approx(0.05) and train.lr_at(cycle, 60) == pytest.approx(0.0)


def test_the_average_of_two_models_is_their_mean_and_bn_is_measured_again():
    torch.manual_seed(0)
    a, b = definitions.resnet20(), definitions.resnet20()
    average = train.add_to_average(None, a)
    average = train.add_to_average(average, b)
    x = torch.randn(64, 3, 32, 32)
    net = train.averaged_model(a, average, 2, [x[:32], x[32:]])
    for (name, p), pa, pb in zip(net.named_parameters(), a.parameters(), b.parameters()):
        torch.testing.assert_close(p, (pa + pb) / 2, msg=name)
    # the first BatchNorm's running statistics are those of its input over all 64 images (a cumulative average)
    _, conv, bn = train.conv_bn_pairs(net)[0]  # the stem, whose input is x itself
    with torch.no_grad():
        z = conv(x)
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, z.var((0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-3)
    assert bn.momentum == 0.1  # restored after the measurement
    assert not net.training and a.training  # the copy is in eval mode; the model it came from is untouched


def test_an_swa_run_writes_the_averaged_model_and_records_it(tmp_path):
    record = train.main(["resnet20", "--init", str(SHIPPED), "--out", str(tmp_path), "--log-dir", str(tmp_path),
                         "--train-npz", str(CALIB), "--test-npz", str(TEST), "--limit-train", "64",
                         "--limit-test", "64", "--batch", "32", "--calib-images", "64", "--threads", "1",
                         "--cycle", "4", "--swa-lr", "0.01", "--swa-start", "0.5", "--bn-images", "64"])
    assert record["cycle"]["swa_lr"] == 0.01 and record["cycle"]["swa_start"] == 0.5
    last = record["history"][-1]
    assert last["averaged_epochs"] == 3  # epochs 2, 3 and 4 end at or after position 2 of 4
    assert last["test_acc_before_averaging"] is not None and last["test_acc"] is not None
    written = onnx.load(str(tmp_path / "resnet20.onnx"))
    onnx.checker.check_model(written)
    meta = {e.key: e.value for e in written.metadata_props}
    assert json.loads(meta[train.TRAINING_KEY]) == record
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.load(TEST)["x"][:64]
    logits = run(str(tmp_path / "resnet20.onnx"), {"input": _normalised(x)})[0]
    assert float((logits.argmax(1) == np.load(TEST)["y"][:64]).mean()) == pytest.approx(last["test_acc"], abs=1e-6)
    assert "averaging 3 epochs' weights" in (tmp_path / "resnet20.log").read_text()


def _normalised(x_uint8: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(train.to_input(torch.from_numpy(x_uint8), channels_last=False).numpy())


def test_swa_start_outside_the_cycle_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--swa-start"):
        train.main(["resnet20", "--init", str(SHIPPED), "--out", str(tmp_path), "--train-npz", str(CALIB),
                    "--test-npz", str(TEST), "--limit-train", "32", "--limit-test", "32", "--cycle", "2",
                    "--swa-lr", "0.01", "--swa-start", "1.5"])


def test_the_images_that_measure_bn_are_spread_over_the_class_sorted_split():
    labels = np.repeat(np.arange(10), 50)  # decode_split sorts by member name, so by class
    assert np.bincount(train.spread(labels, 100)).tolist() == [10] * 10
    assert np.bincount(train.spread(torch.from_numpy(labels), 20).numpy()).tolist() == [2] * 10
    assert train.spread(labels, 1000) is labels
