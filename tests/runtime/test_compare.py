import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxprune.data.sources import Dataset, load_data
from onnxprune.graph.io import load_model
from onnxprune.importance.slp import removal_candidates
from onnxprune.graph.analysis import analyze_model
from onnxprune.runtime.capture import feature_tensor, suffix_model, with_outputs
from onnxprune.runtime import compare
from onnxprune.runtime.compare import Copy, cka_with_original, groups_within, plan_scoring
from onnxprune.similarity.cka import cka
from tests import encoder
from tests.conftest import run
from tests.importance.test_slp import classifier


@given(sizes=st.lists(st.integers(0, 100), max_size=30), budget=st.integers(1, 150))
def test_groups_are_consecutive_and_within_the_budget(sizes, budget):
    groups = groups_within(sizes, budget)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    for g in groups:
        assert sum(sizes[i] for i in g) <= budget or len(g) == 1
    for a, b in zip(groups, groups[1:]):  # a group closes only when the next item would not fit
        assert sum(sizes[i] for i in a) + sizes[b[0]] > budget


@pytest.fixture(scope="module")
def setup():
    model = classifier(seed=3)
    feature = feature_tensor(model)
    copies = []
    for block in removal_candidates(analyze_model(model), 0):
        suffix, side = suffix_model(model, block.output, [feature])
        copies.append(Copy(suffix, {block.output: block.input, **{t: t for t in side}}, feature, feature))
    return model, feature, copies, load_data("random", model, samples=24, seed=4)


def test_each_copy_is_compared_with_the_original_tensor(setup):
    model, feature, copies, data = setup
    values, provider = cka_with_original(model, copies, data, "cpu", batch=10)
    assert provider == "cpu" and len(values) == len(copies)
    names = sorted({source for c in copies for source in c.feeds.values()} | {feature})
    captured = dict(zip([model.graph.output[0].name, *names],
                        run(with_outputs(model, names), {"input": data.inputs["input"]})))
    for c, value in zip(copies, values):
        got = run(c.model, {name: captured[source] for name, source in c.feeds.items()})[0]
        assert value == pytest.approx(cka(captured[feature], got), abs=1e-6)


def test_a_small_memory_budget_splits_the_pass_without_changing_a_value(setup):
    model, _, copies, data = setup
    one_pass, _ = cka_with_original(model, copies, data, "cpu", batch=10, memory_budget=1 << 40)
    roomy = plan_scoring(model, copies, data, 10, memory_budget=1 << 40)
    budget = roomy.estimate - max(roomy.sizes)  # one pass no longer fits
    assert len(plan_scoring(model, copies, data, 10, memory_budget=budget).groups) > 1
    grouped, _ = cka_with_original(model, copies, data, "cpu", batch=10, memory_budget=budget)
    np.testing.assert_allclose(grouped, one_pass, atol=1e-9)
    assert cka_with_original(model, [], data, "cpu") == ([], "cpu")


def _block_copies(model, feature: str) -> list[Copy]:
    copies = []
    for block in removal_candidates(analyze_model(model), 0):
        suffix, side = suffix_model(model, block.output, [feature])
        copies.append(Copy(suffix, {block.output: block.input, **{t: t for t in side}}, feature, feature))
    return copies


def test_token_sequences_are_compared_without_their_padding(exported_encoder, monkeypatch):
    """An encoder's real tokens never see the padding (the mask's bias zeroes their attention to it), so what
    the padding holds must not change a score: the tokens are pooled under the mask (docs/algorithms.md
    section 9). Flattened with their padding, the scores would depend on it."""
    torch_model, path = exported_encoder("torchscript")
    model = load_model(path)
    copies = _block_copies(model, feature_tensor(model))
    feeds = encoder.batch(torch_model, samples=24)
    other = dict(feeds, input_ids=np.where(feeds["attention_mask"] == 1, feeds["input_ids"], 7))
    assert not np.array_equal(other["input_ids"], feeds["input_ids"])
    plain, padded = Dataset(feeds, None, "a"), Dataset(other, None, "b")
    assert compare.token_mask(model, plain) == "attention_mask"
    np.testing.assert_allclose(cka_with_original(model, copies, padded, "cpu", batch=10)[0],
                               cka_with_original(model, copies, plain, "cpu", batch=10)[0], atol=1e-9)
    monkeypatch.setattr(compare, "token_mask", lambda original, data: None)
    flat_plain = cka_with_original(model, copies, plain, "cpu", batch=10)[0]
    assert np.abs(np.subtract(cka_with_original(model, copies, padded, "cpu", batch=10)[0], flat_plain)).max() > 1e-4
