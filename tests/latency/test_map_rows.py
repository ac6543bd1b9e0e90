"""Latency rows of fitted maps (LayerMerge's "replace a block by a fitted map", docs/algorithms.md section 4.3)."""

import numpy as np
import pytest

from onnxprune.latency.table import build_table, map_model, row_signature
from onnxprune.plan import fingerprint
from onnxprune.planning.candidates import FittedMap
from tests.conftest import run
from tests.latency.test_table import FakeBackend
from tests.planning.test_replace import small_resnet, with_maps


@pytest.mark.parametrize("fitted, op_types", [(FittedMap((8, 5, 5), 0), ["Conv"]),
                                              (FittedMap((7, 16), 1), ["MatMul", "Add"])])
def test_a_map_row_is_the_map_as_repair_inserts_it(fitted, op_types):
    model = map_model(fitted, 3)
    assert [n.op_type for n in model.graph.node] == op_types
    x = np.random.default_rng(0).normal(size=(3, *fitted.shape)).astype(np.float32)
    assert run(model, {"x": x})[0].shape == x.shape


def test_the_table_times_each_distinct_map_row_once():
    model, s, options = small_resnet()
    options = with_maps(s, options)
    table = build_table(model, s, options, FakeBackend("fake", 1, whole=1e-3, row=1e-5), 2, fingerprint(model),
                        warmup=1, rounds=3)
    maps = [o for o in options if o.fitted_map]
    assert len(maps) == 3 and row_signature(maps[0], s, 2) in table.rows
    assert len({row_signature(o, s, 2) for o in maps}) == 1  # same shape, one row
    assert all(table.option_latency(o, s) == pytest.approx(1e-5) for o in maps)
    # the table predicts the original as before: maps are options, not part of the original
    assert table.predict([o for o in options if o.original], s) == pytest.approx(table.whole_s)
