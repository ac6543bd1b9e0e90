import importlib.util
import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxprune.errors import MissingDependency, OnnxPruneError
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph
from onnxprune.latency.backends import Backend, BackendUnavailable, OwnClock, get_backend
from onnxprune.latency.measure import compare, random_feeds
from onnxprune.latency.table import FIXED_TOLERANCE, _read_in_situ, build_table, load_table, row_model, row_signature
from onnxprune.plan import fingerprint
from onnxprune.planning.candidates import conv_l1_norms, enumerate_options
from tests.builders import GraphBuilder
from tests.conftest import run
from tests.planning.test_candidates import chain_model


@pytest.fixture(scope="module")
def chain():
    model = chain_model(3)
    s = analyze_model(model)
    return model, s, enumerate_options(s, conv_l1_norms(to_graph(model)))


def test_row_models_have_the_real_output_shape(chain):
    model, s, options = chain
    for option in options:
        if option.remove_block:
            assert row_signature(option, s, 2) is None
            continue
        row = row_model(option, s, batch=2)
        (y,) = run(row, random_feeds(row, 2))
        last = s.convs[option.end - 1]
        assert list(y.shape) == [2, last.out_channels] + last.output_shape[2:], option


def test_identical_rows_share_a_signature(chain):
    model, s, options = chain
    blocks = [o for o in options if o.fold_identity and len(o.keep) == 2]
    assert len(blocks) == 2 and row_signature(blocks[0], s, 1) == row_signature(blocks[1], s, 1)


def test_table_predicts_the_original_and_round_trips(chain, tmp_path):
    model, s, options = chain
    backend = get_backend("ort-cpu", threads=1)
    table = build_table(model, s, options, backend, 2, fingerprint(model), warmup=1, rounds=3)
    assert table.backend["threads"] == 1 and table.batch == 2 and table.dtype == "float32" and table.rounds == 3
    distinct = {row_signature(o, s, 2) for o in options} - {None}
    assert set(table.rows) == distinct and all(v > 0 for v in table.rows.values())
    originals = [o for o in options if o.original]
    assert table.predict(originals, s) == pytest.approx(table.whole_s)
    path = table.save(tmp_path / "t.json")
    assert load_table(path, fingerprint(model)).rows == table.rows
    with pytest.raises(OnnxPruneError, match="another model"):
        load_table(path, "sha256:other")
    data = json.loads(path.read_text())
    data["schema"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(OnnxPruneError, match="schema"):
        load_table(path, fingerprint(model))


def test_compare_takes_turns_and_reports_each_model(chain):
    model, _, _ = chain
    measured = compare([model, model], get_backend("ort-cpu", threads=1), batch=1, rounds=3)
    assert len(measured.medians) == 2 and all(m > 0 for m in measured.medians)
    assert measured.speedups[0] == 1.0 and measured.speedups[1] > 0 and measured.rounds == 3


@pytest.mark.parametrize("name", ["ort-cuda", "ort-tensorrt", "tensorrt"])
def test_gpu_backends_explain_why_they_cannot_run(name):
    if name.startswith("ort") and name.replace("ort-", "").upper() in "".join(ort.get_available_providers()).upper():
        pytest.skip(f"{name} is available here: the GPU benchmark covers it")
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises((BackendUnavailable, MissingDependency), match="needs") as raised:
        get_backend(name)
    assert raised.value.exit_status == 3


def test_gpu_backend_times_a_model_when_there_is_one(chain):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no onnxruntime CUDA provider on this machine (onnxruntime-gpu and a GPU are needed)")
    model, _, _ = chain
    assert get_backend("ort-cuda").time(model, random_feeds(model, 2), 2, 5) > 0


def test_cuda_capture_uses_io_binding_and_matches_cpu(chain):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no onnxruntime CUDA provider on this machine (onnxruntime-gpu and a GPU are needed)")
    from onnxprune.runtime.session import create_session

    model, _, _ = chain
    feeds = random_feeds(model, 2)
    cpu, cuda = create_session(model, "cpu"), create_session(model, "cuda")
    assert cuda.provider == "cuda"
    assert abs(cpu.run(feeds)[0] - cuda.run(feeds)[0]).max() < 1e-3


@dataclass
class FakeBackend(Backend):
    """Runs nothing: the whole model takes ``whole`` seconds and every row ``row`` seconds of its own work."""

    whole: float = 1e-3
    row: float = 1e-4

    def runner(self, model, feeds):
        return lambda: self.whole

    def reference_runner(self, model, feeds):
        return self.runner(model, feeds)

    def own_clock(self, model, feeds):
        return FixedClock(self.row)


class FixedClock(OwnClock):
    def __init__(self, seconds):
        self.own, self.times = seconds, []

    def __call__(self):
        self.times.append(self.own)

    def seconds(self):
        return self.times


def fake_table(model, s, options, rows_share):
    """A table whose original rows sum to ``rows_share`` of a whole model of 1 ms."""
    originals = [o for o in options if o.original]
    backend = FakeBackend("fake", 1, whole=1e-3, row=1e-3 * rows_share / len(originals))
    return build_table(model, s, options, backend, 2, fingerprint(model), warmup=1, rounds=3)


@dataclass
class SlowSpellBackend(FakeBackend):
    """A FakeBackend whose rows take ``first_row`` seconds in the first timing of a table, ``row`` after."""

    first_row: float = 2e-4
    timings: int = 0

    def reference_runner(self, model, feeds):  # once per timing (latency.table.GroupTimer)
        self.timings += 1
        return super().reference_runner(model, feeds)

    def own_clock(self, model, feeds):
        return FixedClock(self.first_row if self.timings == 1 else self.row)


def test_rows_timed_as_slower_than_the_network_are_timed_again_before_a_refusal(chain):
    """A slow spell that tips the original rows past the whole model is timed again, with twice the rounds, and
    the table says so; rows still past it on the second timing are refused."""
    model, s, options = chain
    originals = [o for o in options if o.original]
    share = 1e-3 / len(originals)
    backend = SlowSpellBackend("fake", 1, whole=1e-3, row=0.8 * share, first_row=1.2 * share)
    table = build_table(model, s, options, backend, 2, fingerprint(model), warmup=1, rounds=3)
    assert backend.timings == 2 and table.rounds == 6
    assert table.fixed_s == pytest.approx(0.2e-3)
    assert any("timed twice" in note and "summed to 120.0%" in note for note in table.notes)
    always = SlowSpellBackend("fake", 1, whole=1e-3, row=1.2 * share, first_row=1.2 * share)
    with pytest.raises(OnnxPruneError, match=r"summed to 120\.0% .*more --rounds"):
        build_table(model, s, options, always, 2, fingerprint(model), warmup=1, rounds=3)
    assert always.timings == 2


def test_original_rows_and_blocks_take_their_share_of_the_whole_model_in_situ(chain):
    """An original row costs its nodes' share of the whole model's run times the whole; a new row what it cost
    alone, times in situ / alone of the original rows it replaces; a timed block its branch's share; nothing is
    read without shares."""
    model, s, options = chain
    originals = [o for o in options if o.original]
    table = fake_table(model, s, options, 0.5)
    shares = {n.name: 0.001 * (k + 1) for k, n in enumerate(model.graph.node)}
    alone = dict(table.rows)
    assert _read_in_situ(table, {}, s, originals) is None and not table.in_situ
    assert "read in situ" in _read_in_situ(table, shares, s, originals)
    assert table.rows == alone  # what was timed alone stays in the table

    def situ(p):
        return sum(shares[n] for n in [s.convs[p].name, *s.convs[p].activation_nodes]) * table.whole_s

    def alone_at(p):
        return alone[row_signature(original(s, options, p), s, 2)]

    for o in options:
        signature = row_signature(o, s, 2)
        if signature is None or o.keep_block is not None:
            continue
        positions = range(o.start, o.end)
        expected = (situ(o.start) if o.original else
                    alone[signature] * sum(map(situ, positions)) / sum(map(alone_at, positions)))
        assert table.row_seconds(o, s, signature) == pytest.approx(expected), o
    assert any(not o.original and o.remove_block is None for o in options)  # merges were checked too
    assert table.blocks
    for block in s.residual_blocks:
        if block.join in table.blocks:
            assert table.blocks[block.join] == pytest.approx(sum(shares[n] for n in block.branch_nodes) * table.whole_s)


def test_tables_on_ort_cpu_read_original_rows_in_situ_unless_told(chain):
    model, s, options = chain
    cpu = get_backend("ort-cpu", threads=1)
    table = build_table(model, s, options, cpu, 2, fingerprint(model), warmup=1, rounds=3)
    assert any("read in situ" in note for note in table.notes)
    assert table.predict([o for o in options if o.original], s) == pytest.approx(table.whole_s)
    alone = build_table(model, s, options, cpu, 2, fingerprint(model), warmup=1, rounds=3, in_situ=False)
    assert not any("in situ" in note for note in alone.notes)


def original(s, options, index):
    return next(o for o in options if o.original and o.start == index)


def conv_and_activation(make, opset=17, cout=8):
    """input -> conv 1x1 (8 -> cout) -> activation -> conv 1x1; the analysed model and its options."""
    g = GraphBuilder(("batch", 8, 6, 6), opset=opset)
    y = g.conv(make(g, g.conv(g.input, cout, k=1)), 8, k=1)
    model = infer_shapes(g.build([y]))
    s = analyze_model(model)
    return model, s, enumerate_options(s, conv_l1_norms(to_graph(model)))


def f32(v):
    return np.asarray(v, np.float32)


ACTIVATIONS = {
    "Relu": lambda g, x: g.relu(x),
    "ReLU6": lambda g, x: g.node("Clip", [x, g.const(f32(0)), g.const(f32(6))]),
    "Clip01": lambda g, x: g.node("Clip", [x, g.const(f32(0)), g.const(f32(1))]),
    "ClipMax": lambda g, x: g.node("Clip", [x, "", g.const(f32(3))]),
    "LeakyRelu": lambda g, x: g.node("LeakyRelu", [x], alpha=0.2),
    "PRelu": lambda g, x: g.node("PRelu", [x, g.const(np.full((8, 1, 1), 0.25, np.float32))]),
    "HardSwish": lambda g, x: g.node("HardSwish", [x]),
    "HardSigmoid": lambda g, x: g.node("HardSigmoid", [x], alpha=0.25, beta=0.4),
    "Sigmoid": lambda g, x: g.node("Sigmoid", [x]),
    "Tanh": lambda g, x: g.node("Tanh", [x]),
    "SiLU": lambda g, x: g.node("Mul", [x, g.node("Sigmoid", [x])]),
    "Gelu": lambda g, x: g.node("Mul", [g.node("Mul", [x, g.node("Add", [g.node("Erf", [g.node("Div", [
        x, g.const(f32(2**0.5))])]), g.const(f32(1))])]), g.const(f32(0.5))]),
    "GeluTanh": lambda g, x: g.node("Mul", [g.node("Mul", [x, g.node("Add", [g.node("Tanh", [g.node("Mul", [
        g.node("Add", [x, g.node("Mul", [g.node("Pow", [x, g.const(f32(3))]), g.const(f32(0.044715))])]),
        g.const(f32((2 / np.pi) ** 0.5))])]), g.const(f32(1))])]), g.const(f32(0.5))]),
    "Mish": lambda g, x: g.node("Mul", [x, g.node("Tanh", [g.node("Softplus", [x])])]),
    "Elu": lambda g, x: g.node("Elu", [x], alpha=0.5),
    "Selu": lambda g, x: g.node("Selu", [x], alpha=1.5, gamma=1.1),
    "Celu": lambda g, x: g.node("Celu", [x], alpha=2.0),
    "Softplus": lambda g, x: g.node("Softplus", [x]),
    "ThresholdedRelu": lambda g, x: g.node("ThresholdedRelu", [x], alpha=0.5),
}


def activation_of(model, row, s):
    """(the activation as the network computes it, as the row model computes it) on the same input: the first
    conv of both is made the identity, so each output is the activation of the input."""
    identity = np.eye(8, dtype=np.float32)[:, :, None, None]
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    network = onnx.ModelProto()
    network.CopyFrom(model)
    weights = {first.input[1]: identity, first.input[2]: np.zeros(8, np.float32)}
    for init in network.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    act_out = s.convs[0].activation_nodes[-1]
    out = next(n.output[0] for n in network.graph.node if n.name == act_out)
    network.graph.output.insert(0, onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    solo = onnx.ModelProto()
    solo.CopyFrom(row)
    for init in solo.graph.initializer:
        if init.name in ("w", "b"):
            init.CopyFrom(numpy_helper.from_array(weights[first.input[1] if init.name == "w" else first.input[2]],
                                                  init.name))
    x = np.random.default_rng(0).normal(0, 3, (2, 8, 6, 6)).astype(np.float32)
    return run(network, {"input": x})[0], run(solo, {"x": x})[0]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_row_models_compute_the_activation_of_the_network(name):
    model, s, options = conv_and_activation(ACTIVATIONS[name])
    assert s.convs[0].activation is not None
    row = row_model(original(s, options, 0), s, batch=2)
    onnx.checker.check_model(row, full_check=True)
    expected, got = activation_of(model, row, s)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Clip01", "PRelu", "Gelu", "HardSigmoid"])
def test_float16_row_models_check_and_run(name):
    _, s, options = conv_and_activation(ACTIVATIONS[name])
    row = row_model(original(s, options, 0), s, batch=2, dtype=np.float16)
    onnx.checker.check_model(row, full_check=True)
    (y,) = run(row, random_feeds(row, 2))
    assert y.dtype == np.float16 and y.shape == (2, 8, 6, 6)


def test_mish_op_is_timed_as_its_three_op_form():
    model, s, options = conv_and_activation(lambda g, x: g.node("Mish", [x]), opset=18)
    assert s.convs[0].activation == "Mish"
    row = row_model(original(s, options, 0), s, batch=2)
    assert [n.op_type for n in row.graph.node] == ["Conv", "Softplus", "Tanh", "Mul"]
    onnx.checker.check_model(row, full_check=True)
    expected, got = activation_of(model, row, s)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_clip_bounds_and_alphas_make_different_rows():
    signatures = {}
    for name in ("ReLU6", "Clip01", "ClipMax", "LeakyRelu", "Relu"):
        _, s, options = conv_and_activation(ACTIVATIONS[name])
        signatures[name] = row_signature(original(s, options, 0), s, 2)
    assert len(set(signatures.values())) == len(signatures)
    assert signatures["Clip01"].endswith("Clip(max=1,min=0)") and signatures["ReLU6"].endswith("ReLU6(max=6,min=0)")
    _, s, options = conv_and_activation(lambda g, x: g.node("LeakyRelu", [x], alpha=0.1))
    assert row_signature(original(s, options, 0), s, 2) != signatures["LeakyRelu"]


def test_leaky_relu_row_carries_its_alpha():
    _, s, options = conv_and_activation(ACTIVATIONS["LeakyRelu"])
    row = row_model(original(s, options, 0), s, batch=2)
    (leaky,) = [n for n in row.graph.node if n.op_type == "LeakyRelu"]
    assert onnx.helper.get_attribute_value(leaky.attribute[0]) == pytest.approx(0.2)
    assert "LeakyRelu(alpha=0.2)" in row_signature(original(s, options, 0), s, 2)


def test_prelu_row_has_a_slope_per_channel_of_its_conv():
    slope = np.full((12, 1, 1), 0.1, np.float32)
    _, s, options = conv_and_activation(lambda g, x: g.node("PRelu", [x, g.const(slope)]), cout=12)
    row = row_model(original(s, options, 0), s, batch=2)
    row_slope = next(i for i in row.graph.initializer if i.name == "act_slope")
    assert list(row_slope.dims) == [12, 1, 1]
    assert run(row, random_feeds(row, 2))[0].shape == (2, 12, 6, 6)


def regnet_like():
    """A RegNet/ResNeXt bottleneck: 1x1, grouped 3x3 (2 groups of 4 channels), 1x1, identity residual."""
    g = GraphBuilder(("batch", 8, 8, 8))
    x = g.relu(g.conv(g.input, 8))
    y = g.relu(g.conv(g.relu(g.conv(g.relu(g.conv(x, 8, k=1)), 8, groups=2)), 8, k=1))
    model = infer_shapes(g.build([g.relu(g.add(x, y))]))
    s = analyze_model(model)
    return model, s, enumerate_options(s, conv_l1_norms(to_graph(model)))


def test_grouped_convs_are_timed_grouped():
    model, s, options = regnet_like()
    grouped = next(c for c in s.convs if c.groups == 2)
    option = next(o for o in options if o.original and o.keep == (grouped.name,))
    assert option.groups == 2 and " g2 " in row_signature(option, s, 2)
    row = row_model(option, s, batch=2)
    onnx.checker.check_model(row, full_check=True)
    (conv,) = [n for n in row.graph.node if n.op_type == "Conv"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}["group"] == 2
    assert list(next(i for i in row.graph.initializer if i.name == "w").dims) == [8, 4, 3, 3]
    assert run(row, random_feeds(row, 2))[0].shape == (2, 8, 8, 8)
    merged = [o for o in options if grouped.name in o.keep and len(o.keep) > 1]
    assert merged and all(o.groups == 1 and " g1 " in row_signature(o, s, 2) for o in merged)
    for o in merged:
        run(row_model(o, s, batch=2), random_feeds(row, 2))


def test_an_unknown_activation_is_timed_as_the_bare_conv_and_noted():
    model, s, options = conv_and_activation(ACTIVATIONS["Relu"])
    s.convs[0].activation, s.convs[0].activation_attrs = "Swish7", {"beta": 7.0}
    option = original(s, options, 0)
    row = row_model(option, s, batch=2)
    assert [n.op_type for n in row.graph.node] == ["Conv"]
    assert row_signature(option, s, 2).endswith("Swish7(beta=7)")
    table = fake_table(model, s, options, 0.5)
    assert any("Swish7" in note and "bare conv" in note for note in table.notes)


def test_fixed_part_below_zero_is_refused_beyond_a_tolerance_and_clamped_within(chain, tmp_path):
    model, s, options = chain
    fine = fake_table(model, s, options, 0.8)
    assert fine.fixed_s == pytest.approx(0.2e-3) and fine.notes == []
    clamped = fake_table(model, s, options, 1 + FIXED_TOLERANCE / 2)
    assert clamped.fixed_s == 0.0 and any("clamped" in note for note in clamped.notes)
    with pytest.raises(OnnxPruneError, match=r"summed to 110\.0% .*more --rounds"):
        fake_table(model, s, options, 1.1)
    path = fine.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    data["fixed_s"] = -1e-4
    path.write_text(json.dumps(data))
    with pytest.raises(OnnxPruneError, match=r"summed to 110\.0% .*below zero"):
        load_table(path, fingerprint(model))


def test_a_table_for_another_input_size_is_refused_with_what_to_do(tmp_path):
    def model_at(size):
        g = GraphBuilder(("batch", 8, size, size))
        return infer_shapes(g.build([g.conv(g.relu(g.conv(g.input, 8)), 8)]))

    small, large = model_at(32), model_at(64)
    s = analyze_model(small)
    options = enumerate_options(s, conv_l1_norms(to_graph(small)))
    path = fake_table(small, s, options, 0.5).save(tmp_path / "t.json")
    assert load_table(path, fingerprint(small)).batch == 2
    with pytest.raises(OnnxPruneError, match="another input shape/dtype.*measure it again with onnxprune latency"):
        load_table(path, fingerprint(large))


def test_a_missing_row_names_it(chain):
    model, s, options = chain
    table = fake_table(model, s, options, 0.5)
    table.rows.clear()
    with pytest.raises(OnnxPruneError, match=r"no row 'conv k3x3 s1x1 g1 .*Relu'.*measure it again"):
        table.option_latency(original(s, options, 0), s)


@dataclass
class OverheadBackend(FakeBackend):
    """A whole model of ``whole`` seconds whose kernels take ``kernels`` of them; an empty model takes ``empty``."""

    kernels: float = 6e-4
    empty: float = 1e-4

    def runner(self, model, feeds):
        seconds = self.empty if model.graph.name == "overhead" else self.whole
        return lambda: seconds

    def reference_runner(self, model, feeds):
        return ReferenceClock(self.whole, self.kernels)


class ReferenceClock(FixedClock):
    """Runs in ``wall`` seconds, of which its kernels take ``kernels`` (what a profiled session reports)."""

    def __init__(self, wall, kernels):
        super().__init__(kernels)
        self.wall = wall

    def __call__(self):
        super().__call__()
        return self.wall


def test_rows_pay_the_per_node_overhead_the_whole_model_shows(chain):
    """The whole model's run beyond its kernels and beyond an empty model's run, shared out by node count, is
    added to every row for each node it stands for, so that removing nodes saves their overhead too."""
    model, s, options = chain
    backend = OverheadBackend("fake", 1, whole=1e-3, row=5e-5)
    table = build_table(model, s, options, backend, 2, fingerprint(model), warmup=1, rounds=3)
    nodes = len(to_graph(model).nodes)
    assert table.node_overhead_s == pytest.approx((1e-3 - 6e-4 - 1e-4) / nodes)
    with_activation = next(o for o in options if o.original and s.convs[o.start].activation_nodes)
    signature = row_signature(with_activation, s, 2)
    expected = table.rows[signature] + table.node_overhead_s * (1 + len(s.convs[with_activation.start].activation_nodes))
    assert table.option_latency(with_activation, s) == pytest.approx(expected)
    originals = [o for o in options if o.original]
    assert table.predict(originals, s) == pytest.approx(table.whole_s)  # the fixed part keeps the rest
    plain = fake_table(model, s, options, 0.5)
    assert plain.node_overhead_s == 0.0  # a reference that reports no kernels: no overhead model
