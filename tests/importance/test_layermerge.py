import pytest

from onnxprune.data.sources import load_data
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.normalize import to_graph
from onnxprune.importance.layermerge import row_importances
from onnxprune.importance.slp import removal_candidates, score_blocks
from onnxprune.plan import Plan, apply_plan
from onnxprune.planning.candidates import conv_l1_norms, enumerate_options, options_plan
from onnxprune.runtime.capture import feature_tensor, with_outputs
from onnxprune.similarity.cka import cka
from tests.conftest import run
from tests.importance.test_slp import classifier


@pytest.fixture(scope="module")
def setup():
    model = classifier(seed=7, tiny_block=1)
    s = analyze_model(model)
    options = enumerate_options(s, conv_l1_norms(to_graph(model)))
    data = load_data("random", model, samples=32, seed=2)
    return model, s, options, data


def test_rows_match_running_the_modified_network_whole(setup):
    model, s, options, data = setup
    feature = feature_tensor(model)
    rows, provider = row_importances(model, s, options, data, feature, provider="cpu", batch=16)
    assert provider == "cpu"
    assert [r.option for r in rows] == options
    assert all(r.importance == 0.0 for r in rows if r.option.original)
    assert all(r.importance < 0.0 for r in rows if not r.option.original)
    x = data.inputs["input"]
    reference = run(with_outputs(model, [feature]), {"input": x})[-1]
    for r in [r for r in rows if not r.option.original][:6]:
        modified, _ = apply_plan(model, Plan(**options_plan([r.option])))
        got = run(with_outputs(modified, [feature]), {"input": x})[-1]
        assert r.cka == pytest.approx(cka(reference, got), abs=1e-6)


def test_block_removal_rows_agree_with_slp(setup):
    model, s, options, data = setup
    feature = feature_tensor(model)
    rows, _ = row_importances(model, s, options, data, feature, provider="cpu")
    slp = {b.join: b.score for b in score_blocks(model, data, removal_candidates(s, 0), feature, "cpu").scores}
    for r in rows:
        if r.option.remove_block:
            assert 1 - r.cka == pytest.approx(slp[r.option.remove_block], abs=1e-6)
    tiny = s.residual_blocks[1].join
    removal = {r.option.remove_block: r.importance for r in rows if r.option.remove_block}
    assert max(removal, key=removal.get) == tiny  # the block that does nothing costs least to remove


def test_local_scope_runs_and_orders_like_global(setup):
    model, s, options, data = setup
    feature = feature_tensor(model)
    local, _ = row_importances(model, s, options, data, feature, scope="local", provider="cpu")
    assert all(r.importance <= 0 for r in local)
    removal = {r.option.remove_block: r.importance for r in local if r.option.remove_block}
    assert max(removal, key=removal.get) == s.residual_blocks[1].join
