import json
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.data.sources import load_data
from onnxprune.errors import MissingDependency, OnnxPruneError
from onnxprune.importance.sglp import allocate, prune_sglp, removal, score_sglp
from tests.importance.test_slp import classifier


def test_allocate_largest_remainder():
    assert allocate([3, 3, 2], [3, 3, 2], 4) == [2, 1, 1]  # quotas 1.5, 1.5, 1.0: the earlier .5 wins the tie
    assert allocate([6, 2, 2], [6, 2, 2], 5) == [3, 1, 1]
    assert allocate([4, 1, 1], [1, 1, 1], 3) == [1, 1, 1]  # capped, the rest goes to the others
    assert allocate([4, 1, 1], [1, 1, 1], 9) == [1, 1, 1]  # never more than the caps
    assert allocate([0, 2], [0, 1], 1) == [0, 1] and allocate([2, 2], [1, 1], 0) == [0, 0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=8), st.integers(0, 40))
def test_allocate_gives_out_what_the_caps_allow_and_stays_near_proportional(pairs, total):
    weights = [w for w, _ in pairs]
    caps = [min(c, w) for w, c in pairs]
    counts = allocate(weights, caps, total)
    assert sum(counts) == min(total, sum(caps))
    assert all(0 <= n <= c for n, c in zip(counts, caps))
    if sum(counts) == total and all(c >= w for w, c in zip(weights, caps)) and sum(weights):  # no cap binds
        quotas = [total * w / sum(weights) for w in weights]
        assert all(abs(n - q) < 1 for n, q in zip(counts, quotas))


@pytest.fixture(scope="module")
def scored():
    model = classifier(seed=5)
    return model, score_sglp(model, load_data("random", model, samples=16, seed=0), segments=3, provider="cpu",
                             batch=8)


def test_removal_takes_the_lowest_grad_norm_of_each_segment(scored):
    _, scores = scored
    blocks = scores.segment_blocks()
    weights, caps = scores.capacities()
    assert sum(len(b) for b in blocks) == 6 and len(blocks) == 3
    joins, quotas = removal(scores, 3)
    assert sum(quotas) == 3 and quotas == allocate(weights, caps, 3)
    for segment, quota in zip(blocks, quotas):
        candidates = sorted((j for j in segment if j in scores.removable), key=scores.grad_norm.__getitem__)
        assert [j for j in joins if j in segment] == sorted(candidates[:quota], key=segment.index)
    given_counts = [0] * len(caps)
    given_counts[int(np.argmax(caps))] = 1
    assert len(removal(scores, 0, given_counts)[0]) == 1
    with pytest.raises(OnnxPruneError, match="keeps at least one"):
        removal(scores, 0, [c + 1 for c in caps])


def test_until_stops_at_the_first_plan_that_meets_it():
    model = classifier(seed=5)
    data = load_data("random", model, samples=16, seed=0)
    seen = []

    def enough(pruned):
        seen.append(len(pruned.graph.node))
        return len(seen) == 2

    result = prune_sglp(model, data, until=enough, segments=2, provider="cpu", batch=8)
    assert result.target_met and len(result.plan.remove_blocks) == 2 and len(result.history) == 2
    assert seen[0] > seen[1] and result.plan.method == "sglp"
    never = prune_sglp(model, data, until=lambda m: False, segments=2, provider="cpu", batch=8)
    assert not never.target_met and "keeps at least one block" in never.message


def test_without_torch_sglp_says_how_to_install_it(monkeypatch):
    model = classifier(seed=5)
    monkeypatch.setitem(sys.modules, "onnxprune.train.gradnorm", None)  # importing it raises ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'onnxprune\[torch\]'"):
        prune_sglp(model, load_data("random", model, samples=8), remove_blocks=1)


def test_sglp_to_a_measured_speedup_and_healed(tmp_path, capsys):
    from onnxprune.cli import main
    from onnxprune.plan import load_plan

    path = tmp_path / "net.onnx"
    onnx.save(classifier(seed=5), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((32, 3, 12, 12)).astype(np.float32))
    code = main(["prune", str(path), "--method", "sglp", "--speedup", "1.2", "--rounds", "3", "--data", str(data),
                 "--heal-data", str(data), "--heal-steps", "3", "-o", str(tmp_path / "s.onnx"), "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code in (0, 4) and result["method"] == "sglp" and result["verification"]["passed"]
    assert result["removed_blocks"] and "measured_speedup" in result and "after_healing" in result
    plan = load_plan(tmp_path / "s.plan.json")
    assert plan.method == "sglp" and plan.healing is not None
    history = plan.predicted["history"]
    assert history[-1]["removed"] == plan.remove_blocks and all("measured_speedup" in h for h in history)
