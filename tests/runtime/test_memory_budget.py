"""Scoring within a memory budget (runtime.compare): the budget's parsing and default, the plan it
leads to, scores that do not depend on it, and the temporary folder that never outlives a run."""

import argparse
import tempfile

import numpy as np
import pytest

from onnxprune import cli
from onnxprune.data.sources import load_data
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.normalize import to_graph
from onnxprune.importance.layermerge import row_copies, score_rows
from onnxprune.importance.slp import removal_candidates, score_blocks
from onnxprune.options import ScoringOptions
from onnxprune.planning.candidates import conv_l1_norms, enumerate_options
from onnxprune.runtime import compare
from onnxprune.runtime.capture import feature_tensor, suffix_model
from onnxprune.runtime.compare import (Copy, cka_with_original, default_memory_budget, memory_budget, plan_scoring,
                                       resolve_budget, share_weights)
from tests.conftest import run
from tests.importance.test_slp import classifier

LARGE = 1 << 40


@pytest.mark.parametrize("text, size", [("4G", 4 << 30), ("512M", 512 << 20), ("512m", 512 << 20),
                                        ("1.5GiB", 3 << 29), ("4GB", 4 << 30), ("2K", 2048), ("1T", 1 << 40),
                                        ("1048576", 1 << 20), ("100B", 100), (" 3 G ", 3 << 30)])
def test_a_budget_is_read_with_binary_units(text, size):
    assert cli.memory_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "0", "0.1", "1e9", "four G", "4GG", "inf", "nan"])
def test_a_budget_that_is_not_a_size_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.memory_size(text)


def test_score_and_prune_take_memory_budget_into_scoring_options():
    parser = cli.build_parser()
    args = parser.parse_args(["score", "m.onnx", "--memory-budget", "4G"])
    assert cli.scoring_options(args).memory_budget == 4 << 30
    args = parser.parse_args(["prune", "m.onnx", "--speedup", "1.3", "-o", "out.onnx", "--memory-budget", "512M"])
    assert cli.scoring_options(args).memory_budget == 512 << 20
    assert cli.scoring_options(parser.parse_args(["score", "m.onnx"])).memory_budget is None
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "m.onnx", "--memory-budget", "lots"])
    with pytest.raises(OnnxPruneError, match="memory-budget"):
        ScoringOptions(memory_budget=0)


def test_the_default_budget_is_a_share_of_the_available_memory(monkeypatch):
    available = compare.available_memory()
    assert available is None or available > 0
    if available is not None:
        share = min(compare.MAX_DEFAULT_BUDGET, int(compare.MEMORY_SHARE * available))
        assert default_memory_budget() == max(compare.MIN_BUDGET, share)
    monkeypatch.setattr(compare, "available_memory", lambda: 5 << 30)
    assert default_memory_budget() == int(0.4 * (5 << 30))
    monkeypatch.setattr(compare, "available_memory", lambda: 20 << 30)
    assert default_memory_budget() == 3 << 30
    monkeypatch.setattr(compare, "available_memory", lambda: 1 << 20)
    assert default_memory_budget() == compare.MIN_BUDGET
    monkeypatch.setattr(compare, "available_memory", lambda: None)
    assert default_memory_budget() == 2 << 30


def test_an_explicit_budget_wins_over_the_one_set_for_a_block():
    default = resolve_budget()
    with memory_budget(123456):
        assert resolve_budget() == 123456
        assert resolve_budget(777) == 777
        with memory_budget(None):
            assert resolve_budget() == default
    assert resolve_budget() == default
    with pytest.raises(OnnxPruneError):
        resolve_budget(0)


@pytest.fixture(scope="module")
def setup():
    model = classifier(seed=3)
    feature = feature_tensor(model)
    copies = []
    for block in removal_candidates(analyze_model(model), 0):
        suffix, side = suffix_model(model, block.output, [feature])
        copies.append(Copy(suffix, {block.output: block.input, **{t: t for t in side}}, feature, feature))
    return model, feature, copies, load_data("random", model, samples=26, seed=4)


def test_shared_weights_leave_the_copy_and_come_back_for_its_session(setup, tmp_path):
    model, _, copies, data = setup
    full = copies[0]
    light = share_weights(full, model)
    assert light.shared and len(light.model.graph.initializer) < len(full.model.graph.initializer)
    assert {t.name for t in light.model.graph.initializer} | set(light.shared) == \
        {t.name for t in full.model.graph.initializer}
    files = compare._ModelFiles(tmp_path, model)
    rng = np.random.default_rng(0)
    feeds = {vi.name: rng.standard_normal((3, *[d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]))
             .astype(np.float32) for vi in full.model.graph.input}
    expected = run(full.model, feeds)[0]
    np.testing.assert_allclose(run(files.write(light.model, light.shared), feeds)[0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(files.write(full.model), feeds)[0], expected, rtol=1e-6, atol=1e-6)
    assert share_weights(light, model).shared == light.shared  # sharing twice changes nothing


def _half_of_the_copies(model, copies, data, batch):
    """A budget short of one pass by half the copies' sessions: groups, the captured tensors kept in memory."""
    roomy = plan_scoring(model, copies, data, batch, memory_budget=LARGE)
    return roomy.estimate - sum(roomy.sizes) // 2


def test_the_plan_follows_the_budget(setup, tmp_path):
    model, _, copies, data = setup
    roomy = plan_scoring(model, copies, data, batch=10, memory_budget=LARGE)
    assert roomy.store == "none" and roomy.groups == [list(range(len(copies)))] and roomy.batch == 10
    tiny = plan_scoring(model, copies, data, batch=10, memory_budget=1, spill_dir=str(tmp_path))
    assert tiny.store == "disk" and tiny.groups == [[k] for k in range(len(copies))] and tiny.batch == 1
    grouped = plan_scoring(model, copies, data, batch=10, memory_budget=_half_of_the_copies(model, copies, data, 10))
    assert grouped.store == "memory" and 1 < len(grouped.groups) < len(copies)
    assert [k for g in grouped.groups for k in g] == list(range(len(copies)))


@pytest.mark.parametrize("case", ["disk", "memory", "rerun"])
def test_scores_do_not_depend_on_the_budget(setup, tmp_path, monkeypatch, case):
    model, _, copies, data = setup
    reference, _ = cka_with_original(model, copies, data, "cpu", batch=1, memory_budget=LARGE)
    roomy, _ = cka_with_original(model, copies, data, "cpu", batch=10, memory_budget=LARGE)
    np.testing.assert_allclose(roomy, reference, rtol=0, atol=1e-6)  # another batch: float rounding at most
    if case == "rerun":  # no disk space to spill to: the original runs again for each group
        monkeypatch.setattr(compare, "_disk_free", lambda folder: 0)
    budget = _half_of_the_copies(model, copies, data, 1) if case == "memory" else 1
    plan = plan_scoring(model, copies, data, batch=1, memory_budget=budget, spill_dir=str(tmp_path))
    assert plan.store == {"disk": "disk", "memory": "memory", "rerun": "none"}[case] and len(plan.groups) > 1
    values, provider = cka_with_original(model, copies, data, "cpu", batch=1, memory_budget=budget,
                                         spill_dir=str(tmp_path))
    assert provider == "cpu"
    assert values == reference  # the same batches: the same numbers, bit for bit
    assert list(tmp_path.iterdir()) == []


def test_slp_and_layermerge_scores_within_a_tiny_budget_equal_the_roomy_ones():
    model = classifier(seed=7, tiny_block=1)
    data = load_data("random", model, samples=20, seed=2)
    blocks = removal_candidates(analyze_model(model), 0)
    feature = feature_tensor(model)
    roomy = score_blocks(model, data, blocks, feature, "cpu", batch=8, memory_budget=LARGE)
    tight = score_blocks(model, data, blocks, feature, "cpu", batch=8, memory_budget=1)
    np.testing.assert_allclose([s.score for s in tight.scores], [s.score for s in roomy.scores], atol=1e-6)
    whole = score_blocks(model, data, blocks, feature, "cpu", batch=8, suffix_only=False, memory_budget=1)
    np.testing.assert_allclose([s.score for s in whole.scores], [s.score for s in roomy.scores], atol=1e-6)
    s = analyze_model(model)
    rows = row_copies(model, s, enumerate_options(s, conv_l1_norms(to_graph(model))), feature)
    assert any(c.shared for c in rows.copies)  # the rows hold only what they change
    assert all(share_weights(c, rows.base) is c for c in rows.copies)
    roomy_rows, _ = score_rows(rows, data, "cpu", batch=8, memory_budget=LARGE)
    with memory_budget(1):  # what prune --speedup sets around LayerMerge
        tight_rows, _ = score_rows(rows, data, "cpu", batch=8)
    np.testing.assert_allclose([r.cka for r in tight_rows], [r.cka for r in roomy_rows], atol=1e-6)


def test_a_fixed_batch_model_scores_alike_within_a_tiny_budget():
    from tests.builders import GraphBuilder, residual_block
    from onnxprune.graph.io import infer_shapes

    g = GraphBuilder((4, 3, 8, 8), seed=1)
    x = g.relu(g.conv(g.input, 8))
    for _ in range(3):
        x = residual_block(g, x)
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], 8)
    logits = g.node("Gemm", [pooled, g.const(g.rng.normal(size=(5, 8)).astype(np.float32)),
                             g.const(np.zeros(5, np.float32))], 5, transB=1)
    model = infer_shapes(g.build([logits]))
    data = load_data("random", model, samples=10, seed=3)  # batches of 4: the last one filled up
    assert data.static_batch == 4
    blocks = removal_candidates(analyze_model(model), 0)
    feature = feature_tensor(model)
    roomy = score_blocks(model, data, blocks, feature, "cpu", memory_budget=LARGE)
    tight = score_blocks(model, data, blocks, feature, "cpu", memory_budget=1)
    assert [s.score for s in tight.scores] == [s.score for s in roomy.scores]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["scoring", "capture"])
def test_the_temporary_folder_is_removed_even_on_error(setup, tmp_path, monkeypatch, where):
    model, _, copies, data = setup
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default place of the folder
    seen = []
    if where == "scoring":
        real = compare.accumulator

        class Failing:
            def __init__(self, *args):
                self.inner = real(*args)

            def update(self, x, y):
                seen.append(sorted(p.name for p in tmp_path.glob("onnxprune-scoring-*/captured/*.bin")))
                raise Boom("stop")

        monkeypatch.setattr(compare, "accumulator", Failing)
    else:
        real_append = compare._Store.append

        def append(self, tensors, keep):
            real_append(self, tensors, keep)
            seen.append(sorted(p.name for p in tmp_path.glob("onnxprune-scoring-*/captured/*.bin")))
            if self.batches == 2:
                raise Boom("stop")

        monkeypatch.setattr(compare._Store, "append", append)
    with pytest.raises(Boom):
        cka_with_original(model, copies, data, "cpu", batch=10, memory_budget=1)
    assert seen and seen[-1]  # captured tensors had been spilled to the folder
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_folder_is_removed_after_a_run(setup, tmp_path, monkeypatch):
    model, _, copies, data = setup
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for budget in (1, LARGE):
        cka_with_original(model, copies, data, "cpu", batch=10, memory_budget=budget)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", [["score"], ["prune", "--method", "slp", "--remove-blocks", "1"],
                                  ["prune", "--method", "slp", "--speedup", "1.2"],
                                  ["prune", "--method", "layermerge", "--speedup", "1.2"]])
def test_the_flag_reaches_the_scoring_pass(verb, tmp_path, monkeypatch, capsys):
    import onnx

    from onnxprune.importance import layermerge, slp

    seen = []

    def spy(original, copies, data, provider="auto", batch=64, unbiased=False, memory_budget=None, **kw):
        seen.append(resolve_budget(memory_budget))
        raise OnnxPruneError("stop here")

    monkeypatch.setattr(slp, "cka_with_original", spy)
    monkeypatch.setattr(layermerge, "cka_with_original", spy)
    onnx.save(classifier(seed=5), tmp_path / "net.onnx")
    output = ["-o", str(tmp_path / "out.onnx")] if verb[0] == "prune" else []
    assert cli.main([verb[0], str(tmp_path / "net.onnx"), *verb[1:], *output, "--data", "random", "--samples", "8",
                     "--provider", "cpu", "--memory-budget", "12345K"]) == 2  # OnnxPruneError: exit status 2
    assert "stop here" in capsys.readouterr().err
    assert seen == [12345 * 1024]
    assert resolve_budget() != 12345 * 1024  # set for that run only


def test_a_dynamo_vit_with_shape_side_inputs_scores_alike_within_a_tiny_budget(exported):
    from onnxprune.graph.io import load_model

    model = load_model(exported("vit_b_16", "dynamo"))
    data = load_data("random", model, samples=6)
    blocks = removal_candidates(analyze_model(model), 0)[:3]
    feature = feature_tensor(model)
    roomy = score_blocks(model, data, blocks, feature, "cpu", batch=4, memory_budget=LARGE)
    tight = score_blocks(model, data, blocks, feature, "cpu", batch=4, memory_budget=1)
    np.testing.assert_allclose([s.score for s in tight.scores], [s.score for s in roomy.scores], atol=1e-6)
