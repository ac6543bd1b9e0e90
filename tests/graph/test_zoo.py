"""Analysis of torchvision-style architectures exported by both torch exporters.

The default run uses each architecture at reduced width and input size (same depth and block
structure, see tests/zoo.py); ``-m slow`` repeats it at full size.
"""

import collections

import pytest

from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import load_model
from tests import zoo

EXPORTERS = ("torchscript", "dynamo")
ACTIVATIONS = {
    "resnet18": {"Relu"}, "resnet50": {"Relu"}, "mobilenet_v2": {"ReLU6"},
    "mobilenet_v3_small": {"HardSwish", "Relu"}, "efficientnet_b0": {"SiLU"}, "regnet_x_400mf": {"Relu"},
}


def check_structure(path, name, small=True):
    s = analyze_model(load_model(path))
    blocks = s.residual_blocks
    expected_blocks, expected_projections = (zoo.EXPECTED_SMALL if small else zoo.EXPECTED)[name]
    shortcuts = collections.Counter(b.shortcut for b in blocks)
    assert len(blocks) == expected_blocks, [b.join for b in blocks]
    assert shortcuts["projection"] == expected_projections, shortcuts
    assert shortcuts["unknown"] == 0
    assert all(b.removable for b in blocks if b.shortcut == "identity"), [(b.join, b.reason) for b in blocks]
    assert all(b.macs > 0 and b.params > 0 for b in blocks)
    if name in ACTIVATIONS:
        assert ACTIVATIONS[name] <= {c.activation for c in s.convs}
    return s


@pytest.mark.parametrize(("name", "exporter"), zoo.name_exporter_params())
def test_block_counts_match_the_architecture(exported, name, exporter):
    check_structure(exported(name, exporter), name)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_both_exporters_give_the_same_chain(exported, name):
    a, b = (analyze_model(load_model(exported(name, e))) for e in EXPORTERS)
    def summary(s):
        return [(c.kernel, c.stride, c.groups, c.in_channels, c.out_channels, c.activation) for c in s.convs]
    assert summary(a) == summary(b)
    assert [(x["source"], x["target"]) for x in a.spans] == [(x["source"], x["target"]) for x in b.spans]
    assert a.stride_breaks == b.stride_breaks


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(zoo.EXPECTED))
def test_full_size_block_counts(exported, name, exporter):
    check_structure(exported(name, exporter, small=False), name, small=False)
