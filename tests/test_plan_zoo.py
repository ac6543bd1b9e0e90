"""Block removal on the torchvision-style architectures: every removable block one at a time and
all at once; each result passes verification, and MACs and file size drop as the analysis said."""

import numpy as np
import onnx
import pytest

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes, load_model, save_model
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.plan import Plan, apply_plan
from onnxprune.verify import verify
from tests import zoo


def removal_checks(model, structure, joins, tmp_path):
    pruned, _ = apply_plan(model, Plan(remove_blocks=joins))
    v = verify(model, pruned)
    assert v.passed, v.summary()
    assert v.finite and v.outputs[0].max_abs > 0, v.summary()  # blocks removed: another function, still finite
    removed = [b for b in structure.residual_blocks if b.join in joins]
    after = analyze_model(infer_shapes(pruned))
    assert after.macs == structure.macs - sum(b.macs for b in removed)
    assert len(after.residual_blocks) == len(structure.residual_blocks) - len(joins)
    baseline_model = to_model(to_graph(model), model)  # BN folded, as in every rewritten model
    baseline = save_model(baseline_model, tmp_path / "baseline.onnx").stat().st_size
    size = save_model(pruned, tmp_path / "pruned.onnx").stat().st_size
    predicted = 4 * sum(b.params for b in removed)  # float32 weights
    assert weight_bytes(baseline_model) - weight_bytes(pruned) == predicted
    # The file also loses the removed nodes' own records (names, attributes, value_info): a few hundred bytes each.
    removed_nodes = len(baseline_model.graph.node) - len(pruned.graph.node)
    assert predicted <= baseline - size <= predicted + 600 * removed_nodes, (baseline - size, predicted, removed_nodes)


def weight_bytes(model):
    """Bytes of the float32 weights (not shapes, axes or scalars), as the analysis counts parameters."""
    return sum(len(t.raw_data) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1)


@pytest.mark.parametrize(("name", "exporter"), zoo.name_exporter_params())
def test_remove_all_removable_blocks_at_once(exported, name, exporter, tmp_path):
    model = load_model(exported(name, exporter))
    s = analyze_model(model)
    removal_checks(model, s, [b.join for b in s.residual_blocks if b.removable], tmp_path)


@pytest.mark.parametrize("name", sorted(zoo.EXPECTED))
def test_remove_each_removable_block_alone(exported, name, tmp_path, request):
    """Every removable block alone with ``-m slow``; in the default run at most 3, spread evenly: the first, one in
    the middle and the last (a ViT-B has 24, each a verified rewrite of a 347 MB model)."""
    model = load_model(exported(name, "torchscript"))
    s = analyze_model(model)
    removable = [b for b in s.residual_blocks if b.removable]
    marks = request.config.getoption("-m") or ""
    if not ("slow" in marks and "not slow" not in marks) and len(removable) > 3:
        removable = [removable[round(k * (len(removable) - 1) / 2)] for k in range(3)]
    for block in removable:
        removal_checks(model, s, [block.join], tmp_path)
