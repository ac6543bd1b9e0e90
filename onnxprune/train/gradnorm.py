"""GradNorm importance of residual blocks (SGLP's ranking inside a segment; docs/algorithms.md section 3).

A block's GradNorm is the Euclidean norm of the gradient of the classification loss with respect to the block's
parameters (the float tensors its branch nodes read: weights and biases, BN folded), one norm per calibration batch,
summed over the batches:

    G(b) = sum over batches B of || d CE(f(x_B), y_B) / d theta_b ||_2        (CE: mean cross-entropy over B)

With labels, y are the labels; without them, the original model's own argmax (pseudo-labels: the gradient of the
cross-entropy against one's own argmax is not zero unless the model is certain). The gradients come from the
trainable torch copy of the graph (``GraphModule``), which computes exactly what the graph computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F

from onnxprune import progress
from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import ResidualBlock
from onnxprune.train.bridge import GraphModule


@dataclass(frozen=True)
class GradNormRun:
    norms: dict[str, float]  # block join -> summed per-batch gradient norm
    parameters: dict[str, tuple[str, ...]]  # block join -> the ONNX tensors counted
    batches: int
    samples: int
    labels: str  # "labels" or "pseudo-labels" (the model's own argmax)
    seconds: float


def block_parameters(module: GraphModule, model: onnx.ModelProto,
                     blocks: list[ResidualBlock]) -> dict[str, tuple[str, ...]]:
    """block join -> the trainable tensors its branch nodes read (in ``model``, the graph ``module`` was built from)."""
    params = module.onnx_parameters()
    nodes = {n.name: n for n in model.graph.node}
    found = {}
    for block in blocks:
        names = [t for name in block.branch_nodes if name in nodes for t in nodes[name].input if t in params]
        found[block.join] = tuple(dict.fromkeys(names))
    return found


def grad_norms(model: onnx.ModelProto, blocks: list[ResidualBlock], data: Dataset, batch: int = 64,
               use_labels: bool = True, output: str | None = None, device: str = "cpu") -> GradNormRun:
    """GradNorm of every block in ``blocks`` (found in ``model``) over ``data``; ``output``: the logits (default: the
    first graph output); ``use_labels``: use the data's labels when it has them, else pseudo-labels."""
    start = time.perf_counter()
    logits_name = output or model.graph.output[0].name
    module = GraphModule(model, [logits_name]).to(device)
    module.eval()
    owned = block_parameters(module, model, blocks)
    params = module.onnx_parameters()
    names = list(dict.fromkeys(t for ts in owned.values() for t in ts))
    if not names:
        raise OnnxPruneError("GradNorm found no trainable weights in the blocks' branches")
    tensors = [params[t] for t in names]
    index = {t: i for i, t in enumerate(names)}
    labelled = use_labels and data.labels is not None
    totals = {join: 0.0 for join in owned}
    batches = samples = 0
    for feeds, labels, count in progress.batches(data, batch, "GradNorm"):
        inputs = {k: torch.as_tensor(v).to(device) for k, v in feeds.items()}
        logits = module(inputs)[0][:count].float()
        if logits.ndim != 2:
            logits = logits.reshape(count, -1)
        target = torch.as_tensor(labels[:count], dtype=torch.long, device=device) if labelled \
            else logits.detach().argmax(dim=1)
        loss = F.cross_entropy(logits, target)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        squares = [0.0 if g is None else float((g.double() ** 2).sum()) for g in grads]
        for join, ts in owned.items():
            totals[join] += sum(squares[index[t]] for t in ts) ** 0.5
        batches += 1
        samples += count
    if batches == 0:
        raise OnnxPruneError("no calibration data for GradNorm")
    return GradNormRun(totals, owned, batches, samples, "labels" if labelled else "pseudo-labels",
                       time.perf_counter() - start)
