"""Gated training and layer pruning (onnxprune.train.gates; docs/algorithms.md section 5)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from onnxprune.data.sources import Dataset  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.options import GateTrainingOptions  # noqa: E402
from onnxprune.plan import Plan, apply_plan  # noqa: E402
from onnxprune.train.bridge import GraphModule  # noqa: E402
from onnxprune.train.gates import (GatedModule, gate_gradient, gateable_blocks, reinitialise, train_prune,  # noqa: E402
                                   zero_branch_ends)
from tests.builders import GraphBuilder  # noqa: E402

D = 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: torch's thread pool only spins on a shared machine (milliseconds per 8x8 MatMul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def residual_mlp(kinds: list[str], seed: int = 0, classes: int = 4) -> onnx.ModelProto:
    """x -> blocks h + W2 relu(W1 h) -> Gemm. A block of kind "zero" has its branch multiplied by a Constant 0
    (useless by construction); "useful" blocks have large weights."""
    g = GraphBuilder(("N", D), seed=seed)
    h = g.input
    for i, kind in enumerate(kinds):
        w1 = g.const(g.rng.normal(0, 0.5, (D, D)).astype(np.float32))
        w2 = g.const(g.rng.normal(0, 0.5, (D, D)).astype(np.float32))
        y = g.node("MatMul", [g.node("Relu", [g.node("MatMul", [h, w1], name=f"b{i}_mm1")], name=f"b{i}_relu"), w2],
                   name=f"b{i}_mm2")
        if kind == "zero":
            zero = f"zero_{i}"
            g.nodes.append(helper.make_node("Constant", [], [zero], name=f"b{i}_zero",
                                            value=helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0])))
            y = g.node("Mul", [y, zero], name=f"b{i}_mul")
        h = g.add(h, y, name=f"join{i}")
    w = g.const(g.rng.normal(0, 1.0, (classes, D)).astype(np.float32))
    b = g.const(np.zeros(classes, np.float32))
    out = g.node("Gemm", [h, w, b], channels=classes, name="head", transB=1)
    model = g.build([out])
    return load_model_proto(model)


def load_model_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, path)
        return load_model(path)


def dataset(n: int = 256, seed: int = 0) -> Dataset:
    x = np.random.default_rng(seed).normal(0, 1, (n, D)).astype(np.float32)
    return Dataset(inputs={"input": x}, labels=None, source="synthetic")


def test_blocks_are_found_and_gated() -> None:
    model = residual_mlp(["useful", "zero", "useful"])
    blocks = gateable_blocks(model)
    assert [b.join for b in blocks] == ["join0", "join1", "join2"]
    module = GraphModule(model)
    gated = GatedModule(module, blocks)
    assert [g.size for g in gated.gates] == [2 * D * D] * 3


def test_estimator_is_unbiased_exactly() -> None:
    """E[gate_gradient] over all per-sample gate draws equals d E[mean loss] / d theta, enumerated exactly."""
    model = residual_mlp(["useful", "useful", "useful"], seed=3)
    module = GraphModule(model)
    gated = GatedModule(module, gateable_blocks(model))
    theta = torch.tensor([0.3, 0.55, 0.8], dtype=torch.float64)
    gated.theta = theta.clone()
    x = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (2, D)).astype(np.float32))
    n, blocks = 2, 3

    @torch.no_grad()
    def losses(xi: torch.Tensor) -> torch.Tensor:
        gated.xi = xi
        return module({"input": x})[0].double().square().sum(1)

    def probability(bits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # bits (blocks, samples)
        return torch.prod(torch.where(bits.bool(), t.reshape(-1, 1), 1 - t.reshape(-1, 1)))

    # the exact gradient: 2^3 configurations per sample, shared by both samples (xi columns equal)
    t = theta.clone().requires_grad_(True)
    expected = torch.zeros((), dtype=torch.float64)
    for config in itertools.product([0.0, 1.0], repeat=blocks):
        bits = torch.tensor(config).reshape(blocks, 1)
        expected = expected + probability(bits, t) * losses(bits.repeat(1, n).float()).mean()
    (exact,) = torch.autograd.grad(expected, t)
    # the estimator's expectation: all 2^(3 x 2) per-sample draws
    mean = torch.zeros(blocks, dtype=torch.float64)
    for config in itertools.product([0.0, 1.0], repeat=blocks * n):
        xi = torch.tensor(config).reshape(blocks, n)
        p = probability(xi, theta)
        mean += p * gate_gradient(losses(xi.float()), xi, theta)
    assert torch.allclose(mean, exact, rtol=1e-5, atol=1e-6), (mean, exact)
    assert exact.abs().min() > 1e-3  # a real test: the gradient is not trivially zero


def test_useless_blocks_pruned_useful_kept() -> None:
    """Blocks multiplied by zero lose their gate and are removed; useful ones end at theta 1. The nodes evaluated
    per step fall as blocks go."""
    model = residual_mlp(["useful", "zero", "useful", "zero"])
    options = GateTrainingOptions(steps=300, batch=32, lr=1e-3, theta_lr=0.05, block_cost=0.05, patience=5,
                                  augment=False, evaluations=5)
    run = train_prune(model, dataset(), options)
    record = run.record
    assert sorted(run.removed) == ["join1", "join3"]
    theta = dict(zip(record["blocks"], record["final_theta"]))
    assert theta["join0"] >= 0.95 and theta["join2"] >= 0.95, theta
    assert all(isinstance(record["pruned_at"][j], int) for j in ("join1", "join3"))
    assert record["nodes_per_step"]["last"] == record["nodes_per_step"]["first"] - 2 * 4  # mm, relu, mm, mul each
    assert len(record["history"]) == 6 and len(record["history"][0]["theta"]) == 4
    pruned, summary = apply_plan(run.model, Plan(remove_blocks=run.removed))
    assert summary["removed_blocks"] == ["join1", "join3"]
    assert len(pruned.graph.node) < len(model.graph.node)


def test_noisy_block_pruned_against_teacher() -> None:
    """A branch that adds to the output what the teacher (a function of the input alone) does not have is
    harmful: its gate closes and it goes, with the useless one."""
    student = residual_mlp(["useful", "useful", "zero"], seed=5)
    teacher = residual_mlp(["useful", "zero", "zero"], seed=5)  # same weights, block 1's branch silenced
    options = GateTrainingOptions(steps=300, batch=32, lr=1e-3, theta_lr=0.05, block_cost=0.05, patience=5,
                                  augment=False, evaluations=3)
    run = train_prune(student, dataset(), options, teacher_model=teacher)
    assert sorted(run.removed) == ["join1", "join2"]
    assert dict(zip(run.record["blocks"], run.record["final_theta"]))["join0"] >= 0.95


def test_bypass_skips_the_branch() -> None:
    model = residual_mlp(["useful", "useful"])
    module = GraphModule(model)
    x = {"input": torch.ones(3, D)}
    before = module.active_nodes
    module(x)
    assert module.nodes_evaluated == before
    module.bypass({"join0": "input"})
    assert module.active_nodes == before - 3  # MatMul, Relu, MatMul gone; the join hands on its input
    expected = GraphModule(apply_plan(model, Plan(remove_blocks=["join0"]))[0])(x)[0]
    assert torch.allclose(module(x)[0], expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_from_scratch_branches_start_at_zero_so_every_block_starts_as_the_identity(kind) -> None:
    """After re-initialising, zero_branch_ends zeroes each gated branch's last layer (MatMul; Conv + BatchNorm):
    the network computes what it computes with every block bypassed."""
    from tests.builders import residual_block

    if kind == "mlp":
        model, x = residual_mlp(["useful", "useful", "useful"]), torch.ones(3, D)
    else:
        g = GraphBuilder(("N", 3, 8, 8), seed=2)
        h = g.relu(g.conv(g.input, 8))
        for _ in range(2):
            h = residual_block(g, h)
        model, x = load_model_proto(g.build([h])), torch.randn(2, 3, 8, 8)
    gates = GatedModule(GraphModule(model), gateable_blocks(model)).gates  # where the branches end
    module = GraphModule(model)  # run ungated
    reinitialise(module)
    assert zero_branch_ends(module, gates) == len(gates)
    out = module({"input": x})[0]
    assert out.abs().max() > 0
    module.bypass({gate.join: gate.shortcut for gate in gates})
    assert torch.allclose(out, module({"input": x})[0], atol=1e-6)
