"""The L x L linear-CKA matrix between layers of one network (SGLP's first step; docs/algorithms.md section 3).

The layers are the stem's output (the tensor the first residual block reads) and every residual block's output, in
graph order. One pass of the model over the calibration data captures all of them (``with_outputs``).

Which CKA: the *unbiased minibatch* estimator (Nguyen, Raghu & Kornblith, ICLR 2021), on the flattened outputs.
Per batch of b samples, every layer's b x b Gram matrix K_i = X_i X_i^T is formed, and for every pair

    HSIC_1(K_i, K_j) = [ tr(K~_i K~_j) + (1^T K~_i 1)(1^T K~_j 1) / ((b-1)(b-2)) - 2/(b-2) (K~_i 1)^T (K~_j 1) ]
                       / ( b (b-3) )                                   (K~: K with its diagonal zeroed)

is summed over batches; at the end M[i, j] = H[i, j] / sqrt(H[i, i] H[j, j]). All L^2 pairs of a batch come from three
matrix products (the flattened K~'s against each other, their row sums against each other, and an outer product of
their sums), so a batch costs O(L b^2 p) for the Gram matrices plus O(L^2 b^2) for the pairs, and the memory held
between batches is the L x L sum alone, whatever the number of samples.

Why this form: block outputs are feature maps (16 x 32 x 32 = 16,384 values per sample in a CIFAR ResNet), so the
feature form's cross-covariances (p_i x p_j per pair, 2 GiB in float64 for one such pair) are out, and the Gram form
over all n samples needs n x n per layer with every sample held at once. Pooling each map to its channel means would
make the feature form cheap, but compares something other than the block's output (all spatial structure gone). The
minibatch estimator keeps the flattened outputs and needs only one batch at a time; its unbiased HSIC makes the value
independent of the batch size in expectation (the plain estimator, averaged over batches, is inflated more the smaller
the batch). The paper's own code likewise averages its matrix over a few batches. Values can come out slightly
negative for unrelated layers; the diagonal is exactly 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import Structure
from onnxprune.runtime.capture import capture_batch, with_outputs
from onnxprune.runtime.session import create_session

log = logging.getLogger(__name__)

MIN_BATCH = 4  # the unbiased HSIC needs at least 4 samples


@dataclass(frozen=True)
class LayerMatrix:
    layers: tuple[str, ...]  # the tensors compared, in graph order (the stem's output first)
    blocks: tuple[str | None, ...]  # the join of the block whose output each layer is (None: the stem)
    cka: np.ndarray  # L x L, symmetric, diagonal 1
    samples: int  # samples that entered the sums (batches under MIN_BATCH samples are left out)
    provider: str


def block_layers(structure: Structure) -> tuple[list[str], list[str | None]]:
    """(tensor names, block joins): the stem's output, then every residual block's output, in graph order."""
    blocks = structure.residual_blocks
    if not blocks:
        raise OnnxPruneError("the model has no residual block: no layers to compare")
    return [blocks[0].input] + [b.output for b in blocks], [None] + [b.join for b in blocks]


class MinibatchCKA:
    """Unbiased minibatch CKA between every pair of L representations, accumulated one batch at a time."""

    def __init__(self, layers: int) -> None:
        self.hsic = np.zeros((layers, layers))
        self.samples = 0
        self._scale: list[float] | None = None

    def update(self, representations: list[np.ndarray]) -> None:
        """One batch: a (b, ...) array per layer, the same b samples in each."""
        b = len(representations[0])
        if b < MIN_BATCH:
            return
        if self._scale is None:  # one constant per layer (CKA ignores it) keeps float64 well within range
            self._scale = [1.0 / max(np.linalg.norm(_flat(x)) / np.sqrt(b), 1e-300) for x in representations]
        grams = np.empty((len(representations), b, b))
        for i, x in enumerate(representations):
            x = _flat(x) * self._scale[i]
            grams[i] = x @ x.T
            np.fill_diagonal(grams[i], 0.0)
        flat = grams.reshape(len(grams), -1)
        rows = grams.sum(axis=2)  # K~ 1, one row per layer
        sums = rows.sum(axis=1)  # 1^T K~ 1
        self.hsic += (flat @ flat.T + np.outer(sums, sums) / ((b - 1) * (b - 2)) - 2.0 / (b - 2) * rows @ rows.T) \
            / (b * (b - 3))
        self.samples += b

    def value(self) -> np.ndarray:
        diag = np.diag(self.hsic)
        den = np.sqrt(np.clip(np.outer(diag, diag), 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            cka = np.where(den > 0, self.hsic / np.where(den > 0, den, 1.0), 0.0)
        np.fill_diagonal(cka, 1.0)
        return cka


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def layer_cka(model: onnx.ModelProto, structure: Structure, data: Dataset, provider: str = "auto",
              batch: int = 64) -> LayerMatrix:
    """The CKA matrix of the stem's and every residual block's output on ``data``, in one pass of ``model``."""
    layers, joins = block_layers(structure)
    computed = [name for name in dict.fromkeys(layers) if name not in data.inputs]  # a block may read a graph input
    session = create_session(with_outputs(model, computed), provider)
    size = max(MIN_BATCH, capture_batch(model, computed, batch))
    accumulator = MinibatchCKA(len(layers))
    for feeds, _, count in progress.batches(data, size, "CKA matrix"):
        values = {**feeds, **dict(zip(computed, session.run(feeds, computed)))}
        accumulator.update([values[name][:count] for name in layers])
    if accumulator.samples == 0:
        raise OnnxPruneError(f"the CKA matrix needs batches of at least {MIN_BATCH} samples")
    if accumulator.samples < len(data):
        log.info(f"sglp: {len(data) - accumulator.samples} samples in a batch under {MIN_BATCH} left out of the CKA "
                 "matrix")
    return LayerMatrix(tuple(layers), tuple(joins), accumulator.value(), accumulator.samples, session.provider)
