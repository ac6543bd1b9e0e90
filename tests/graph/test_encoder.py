"""A post-LN, BERT-style encoder with its attention mask as a second graph input (docs/algorithms.md
sections 0 and 9): every attention and MLP block is found and removable, the mask's Add is no join,
and removing a block leaves LN(x), as the torch model with that sublayer skipped computes."""

import numpy as np
import onnx
import pytest

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import load_model
from onnxprune.plan import Plan, apply_plan
from tests import encoder
from tests.conftest import run

EXPORTERS = ["torchscript", "dynamo"]


def _ops_in(model: onnx.ModelProto, names: list[str]) -> set[str]:
    wanted = set(names)
    return {n.op_type for n in model.graph.node if n.name in wanted}


def _readers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_every_attention_and_mlp_block_is_found_and_removable(exported_encoder, exporter):
    torch_model, path = exported_encoder(exporter)
    model = load_model(path)
    s = analyze_model(model)
    blocks = s.residual_blocks
    assert len(blocks) == 2 * len(torch_model.layers)
    assert all(b.removable and b.shortcut == "identity" for b in blocks), [(b.join, b.reason) for b in blocks]
    assert not any("shortcut unknown" in note for note in s.notes)
    assert any("side inputs ['attention_mask']" in note for note in s.notes)
    # attention then MLP, layer after layer: only the attention blocks hold the Softmax
    assert ["Softmax" in _ops_in(model, b.branch_nodes) for b in blocks] == [True, False] * len(torch_model.layers)
    for b in blocks:  # post-LN: the block's input is the previous LayerNorm's output, a LayerNorm reads the join
        assert b.input_shape == b.output_shape == ["batch", 16, 32]
        assert _ops_in(model, [b.fork]) == {"LayerNormalization"}
        assert [n.op_type for n in _readers(model, b.output)] == ["LayerNormalization"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_the_mask_add_is_a_bias_not_a_join(exported_encoder, exporter):
    _, path = exported_encoder(exporter)
    model = load_model(path)
    joins = {b.join for b in analyze_model(model).residual_blocks}
    producer = {t: n for n in model.graph.node for t in n.output}
    softmax_inputs = [producer[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]
    mask_adds = [n for n in softmax_inputs if n.op_type == "Add"]
    assert len(mask_adds) == 4 and not joins.intersection(n.name for n in mask_adds)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_removing_any_block_leaves_layernorm_of_its_input(exported_encoder, exporter):
    torch_model, path = exported_encoder(exporter)
    model = load_model(path)
    feeds = encoder.batch(torch_model)
    np.testing.assert_allclose(run(model, feeds)[0], encoder.torch_output(torch_model, feeds), atol=1e-4)
    for k, block in enumerate(analyze_model(model).residual_blocks):
        pruned, _ = apply_plan(model, Plan(remove_blocks=[block.join]))
        onnx.checker.check_model(pruned, full_check=True)
        assert [n.op_type for n in _readers(pruned, block.input) if n.op_type == "LayerNormalization"]
        skipped = {k // 2: ("attention",) if k % 2 == 0 else ("mlp",)}
        expected = encoder.torch_output(torch_model, feeds, skip=skipped)
        np.testing.assert_allclose(run(pruned, feeds)[0], expected, atol=1e-4, err_msg=block.join)


def test_token_type_ids_are_a_side_input_too(exported_encoder):
    torch_model, path = exported_encoder("torchscript", token_types=True)
    model = load_model(path)
    s = analyze_model(model)
    assert any("side inputs ['attention_mask', 'token_type_ids']" in note for note in s.notes)
    assert len(s.residual_blocks) == 8 and all(b.removable for b in s.residual_blocks)
    feeds = encoder.batch(torch_model)
    pruned, _ = apply_plan(model, Plan(remove_blocks=[s.residual_blocks[0].join, s.residual_blocks[-1].join]))
    expected = encoder.torch_output(torch_model, feeds, skip={0: ("attention",), 3: ("mlp",)})
    np.testing.assert_allclose(run(pruned, feeds)[0], expected, atol=1e-4)
