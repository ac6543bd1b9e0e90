"""Every LayerMerge option, alone or tiled with others, gives a model that passes verification."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes, load_model
from onnxprune.graph.normalize import to_graph
from onnxprune.plan import Plan, apply_plan
from onnxprune.planning.candidates import conv_l1_norms, enumerate_options, options_plan, valid_segment
from onnxprune.verify import TOLERANCE, verify
from tests.builders import GraphBuilder, residual_block


def chain_model(seed=0):
    """stem, a plain 3-conv stretch, two identity blocks, a strided conv with a 1x1 after it."""
    g = GraphBuilder(("batch", 3, 16, 16), seed=seed)
    x = g.relu(g.conv(g.input, 8))
    x = g.relu(g.conv(g.relu(g.conv(x, 8, k=1)), 8, groups=8))
    x = residual_block(g, residual_block(g, x))
    x = g.relu(g.conv(g.relu(g.conv(x, 16, stride=2)), 16, k=1))
    return infer_shapes(g.build([x]))


def options_of(model):
    s = analyze_model(model)
    return s, enumerate_options(s, conv_l1_norms(to_graph(model)))


def test_segments_respect_barriers_strides_and_spans():
    s, options = options_of(chain_model())
    spans = [(sp["source"] + 1, sp["target"] + 1) for sp in s.spans]
    assert spans == [(3, 5), (5, 7)]
    assert valid_segment(s, 3, 5) == (True, s.residual_blocks[0].join)
    assert not valid_segment(s, 4, 6)[0]  # half of one block and half of the next
    assert not valid_segment(s, 2, 4)[0]  # reaches into a block from outside
    strided = next(c.index for c in s.convs if c.stride == [2, 2])
    assert valid_segment(s, strided, strided + 2)[0]  # a 1x1 after the strided conv
    kinds = {(o.start, o.end): o for o in options if o.remove_block}
    assert set(kinds) == {(3, 5), (5, 7)}
    assert all(o.kernel[0] <= 7 for o in options)


def test_every_option_alone_verifies():
    model = chain_model(1)
    s, options = options_of(model)
    assert len(options) > 20
    for option in options:
        pruned, summary = apply_plan(model, Plan(**options_plan([option])))
        v = verify(model, pruned)
        assert v.passed, (option, v.summary())
        if option.original:
            assert v.identical
        assert summary["changes_function"] or all(o.scaled <= TOLERANCE for o in v.outputs), (option, v.summary())
        assert not summary["changes_function"] or not v.identical, option


@st.composite
def tilings(draw, options, positions):
    chosen, pos = [], 0
    while pos < positions:
        starting = [o for o in options if o.start == pos]
        option = draw(st.sampled_from(starting))
        chosen.append(option)
        pos = option.end
    return chosen


MODEL = chain_model(2)
STRUCTURE, OPTIONS = options_of(MODEL)


@settings(max_examples=25, deadline=None)
@given(tilings(OPTIONS, len(STRUCTURE.convs)))
def test_any_tiling_of_options_verifies(chosen):
    pruned, summary = apply_plan(MODEL, Plan(**options_plan(chosen)))
    v = verify(MODEL, pruned)
    assert v.passed
    assert summary["changes_function"] or all(o.scaled <= TOLERANCE for o in v.outputs), v.summary()
    after = analyze_model(infer_shapes(pruned))
    assert len(after.convs) == sum(1 if o.keep else 0 for o in chosen)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_mobilenet_v2_options_verify(exported, exporter):
    model = load_model(exported("mobilenet_v2", exporter))
    s, options = options_of(model)
    assert sum(o.remove_block is not None for o in options) == 10
    rng = np.random.default_rng(0)
    for option in [o for o in options if not o.original][:: max(1, len(options) // 25)] + \
            [options[i] for i in rng.choice(len(options), 5, replace=False)]:
        pruned, summary = apply_plan(model, Plan(**options_plan([option])))
        v = verify(model, pruned)
        assert v.passed, option
        assert summary["changes_function"] or all(o.scaled <= TOLERANCE for o in v.outputs), (option, v.summary())


def test_blocks_with_barriers_inside_can_still_be_removed(exported):
    model = load_model(exported("efficientnet_b0", "dynamo"))
    s, options = options_of(model)
    removals = [o for o in options if o.remove_block]
    assert len(removals) == 9  # every identity MBConv, though squeeze-excite barriers lie inside
    pruned, _ = apply_plan(model, Plan(**options_plan(removals[:3])))
    v = verify(model, pruned)
    assert v.passed
    assert v.finite and v.outputs[0].max_abs > 0  # three blocks removed: another function
