"""Options, one small frozen dataclass per concern, built once (by a CLI argument group or by a Python caller)
and passed down as they are. Each says what it means for every verb that reads it; ``check_method`` refuses a
flag that the chosen pruning method would ignore.

    from onnxprune import api
    from onnxprune.options import DataOptions, OutputOptions, TargetOptions
    api.prune("model.onnx", TargetOptions(method="slp", remove_blocks=2), OutputOptions("pruned.onnx"),
              DataOptions("calib.npz", samples=256))
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

from onnxprune.errors import OnnxPruneError

METHODS = ("slp", "layermerge", "sglp")
SCOPES = ("global", "local")


@dataclass(frozen=True)
class DataOptions:
    """Calibration or evaluation data (``--data`` and its group)."""

    source: str | None = None  # a .npy/.npz file, an image folder, a tar of images, "random"; None: random inputs
    labels: str | None = None  # a .npy of integer labels, overriding the data's own
    samples: int | None = None  # a seeded random subset of this many samples
    seed: int = 0
    batch: int = 64  # samples per onnxruntime run (a model with a fixed batch dimension takes its own)
    mean: tuple[float, ...] | None = None  # preprocessing of uint8 images, overriding the model's metadata
    std: tuple[float, ...] | None = None
    scale: float | None = None
    layout: str | None = None
    size: tuple[int, ...] | None = None
    input_shape: tuple[int, ...] | None = None  # sizes after the batch for a model input with symbolic sizes

    @property
    def preprocess_overrides(self) -> dict:
        return {"mean": self.mean, "std": self.std, "scale": self.scale, "layout": self.layout, "size": self.size}


@dataclass(frozen=True)
class ScoringOptions:
    """How changes are scored: CKA at a representation, computed with onnxruntime."""

    feature_tensor: str | None = None  # None: the classifier's input (the last Gemm/MatMul's data input)
    provider: str = "auto"  # onnxruntime provider: auto, cpu, cuda, tensorrt
    scope: str | None = None  # layermerge only: "global" (at the feature tensor, the default) or "local"
    # Bytes that capture and scoring may hold (sessions, captured tensors, CKA accumulators), beyond the data
    # set and the models themselves. None: 40% of the memory available when scoring starts, at most 3 GiB
    # (runtime.compare.default_memory_budget). Scores do not depend on it beyond float rounding.
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        if self.memory_budget is not None and self.memory_budget < 1:
            raise OnnxPruneError(f"--memory-budget must be a positive size in bytes, not {self.memory_budget}")


@dataclass(frozen=True)
class LatencyOptions:
    """Where and how latency is measured."""

    backend: str = "ort-cpu"
    batch: int | None = None  # None: the model's fixed batch size, or 1 for a dynamic batch
    threads: int | None = None  # CPU threads for ort-cpu; None: all this process may use
    rounds: int | None = None  # None: each verb's default
    table: str | None = None  # layermerge only: reuse a table written by `onnxprune latency`


@dataclass(frozen=True)
class TargetOptions:
    """What to prune to, and by which method."""

    method: str = "slp"
    speedup: float | None = None  # measured on the latency backend, original / pruned
    remove_blocks: int | None = None  # slp and sglp
    macs_reduction: float | None = None  # slp only: a fraction of the MACs
    min_blocks_per_stage: int | None = None  # slp only (default 1): blocks each stage keeps
    one_shot: bool = False  # slp only: rank once instead of re-scoring after each removal
    segments: int | None = None  # sglp only: K segments of the layer sequence; None: the elbow of the loss curve

    @property
    def min_blocks(self) -> int:
        return 1 if self.min_blocks_per_stage is None else self.min_blocks_per_stage


@dataclass(frozen=True)
class OutputOptions:
    """Where results go."""

    model: str  # the pruned .onnx file
    plan: str | None = None  # None: the model's path with .plan.json
    pareto: str | None = None  # layermerge only: the predicted trade-off curve (JSON)
    plot: bool = False  # sglp only: a PNG of the CKA matrix and the segments beside the model (OUT with .cka.png)
    # layermerge: the predicted trade-off curve in the result too ("pareto"; what an HTML report draws), with or
    # without a ``pareto`` file
    curve: bool = False


@dataclass(frozen=True)
class HealingOptions:
    """How a pruned model is healed against its original (``heal``, ``prune --heal-data``; docs/algorithms.md,
    section "Healing"). The loss is label-free by default: the mean squared error at the feature map before
    global pooling, relative to the teacher's mean square there, plus the KL divergence of the logits at
    ``temperature`` (times its square), and with ``match_blocks`` the relative MSE at every residual block output
    the pruned model keeps; cross-entropy joins when the data has labels, unless ``use_labels`` is False."""

    steps: int | None = None  # optimiser steps; None: ``epochs`` over the training part, else DEFAULT_STEPS
    epochs: float | None = None  # passes over the training part of the data (excludes ``steps``)
    batch: int = 64  # samples per step (a model with a fixed batch dimension takes its own)
    lr: float = 3e-4  # AdamW's peak learning rate: a short linear warm-up, then cosine decay to zero
    weight_decay: float = 0.0
    temperature: float = 4.0
    feature_weight: float = 1.0
    logit_weight: float = 1.0
    use_labels: bool = True  # add cross-entropy when the data has labels (False: label-free whatever the data)
    augment: bool = True  # random crop (zero padding of 1/8 of the size) and horizontal flip, for image inputs
    # blend each augmented image with another of the batch (teacher and student see the blend); left out when
    # cross-entropy on labels is used (a blend has no label). None: on when the training part is smaller than
    # MIXUP_BELOW samples, where the run passes over each image many times, off on a large data set
    mixup: bool | None = None
    holdout: float = 0.1  # share of the data held back to measure agreement and keep the best checkpoint (lowest KL)
    evaluations: int = 10  # held-back measurements over the run (the best one is kept)
    device: str = "cpu"  # torch device: cpu or cuda
    feature_tensor: str | None = None  # None: the input of the global pooling before the classifier
    match_blocks: bool = False  # also match the residual block outputs the pruned model keeps (hints)
    block_weight: float = 1.0  # weight of the block outputs' mean relative MSE
    ema: float | None = None  # decay of a moving average of the weights, evaluated and kept instead of them
    seed: int = 0
    min_agreement: float | None = None  # the target: held-back agreement with the original after healing

    DEFAULT_STEPS = 1000
    MIXUP_BELOW = 10_000  # mixup helped on 461 training images and hurt on 49,000 (docs/heal.md)

    def blends(self, train_samples: int) -> bool:
        """Whether mixup is on for a training part of ``train_samples`` (``mixup``, or its default by size)."""
        return self.mixup if self.mixup is not None else train_samples < self.MIXUP_BELOW

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise OnnxPruneError("give --heal-steps or --heal-epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise OnnxPruneError("healing needs at least one step")
        if not 0 < self.holdout < 1:
            raise OnnxPruneError(f"--holdout is a share of the data between 0 and 1, not {self.holdout}")
        if self.device not in ("cpu", "cuda"):
            raise OnnxPruneError(f"--device is cpu or cuda, not {self.device!r}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise OnnxPruneError(f"--min-agreement is a share between 0 and 1, not {self.min_agreement}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise OnnxPruneError(f"the weights' moving average decays by a factor between 0 and 1, not {self.ema}")
        if self.lr <= 0 or self.batch < 1 or self.temperature <= 0:
            raise OnnxPruneError("the learning rate, batch and temperature of healing must be positive")


@dataclass(frozen=True)
class RepairOptions:
    """Training-free repair (``repair``, ``prune --repair linear``; docs/algorithms.md section 8): at every cut a
    pruning left, an affine map from the pruned model's tensor to the original's, fitted by ridge least squares on
    the calibration data."""

    method: str = "linear"
    ridge: float = 1e-3  # the ridge term, relative to the mean variance of the map's input channels
    sequential: bool = True  # fit each map on the activations of the model repaired so far (False: the original's)
    fold: bool = True  # fold a map into the conv/MatMul/Gemm that produces its input where that is exact
    batch: int = 64  # samples per onnxruntime run while the sums are gathered

    def __post_init__(self) -> None:
        if self.method != "linear":
            raise OnnxPruneError(f"--repair knows only 'linear', not {self.method!r}")
        if self.ridge < 0:
            raise OnnxPruneError(f"the ridge term is at least 0, not {self.ridge}")
        if self.batch < 1:
            raise OnnxPruneError("the repair batch must be at least 1")


@dataclass(frozen=True)
class GateTrainingOptions:
    """Concurrent training and layer pruning with learned Bernoulli gates (``train-prune``; docs/algorithms.md
    section 5). Every removable residual branch gets a gate kept with probability theta; the weights (AdamW) and
    the thetas (projected SGD) learn together, and a block whose theta stays under ``threshold`` for ``patience``
    steps is pruned: no longer computed."""

    steps: int | None = None  # optimiser steps; None: ``epochs`` over the training part, else DEFAULT_STEPS
    epochs: float | None = None  # passes over the training part of the data (excludes ``steps``)
    batch: int = 64  # samples per step (a model with a fixed batch dimension takes its own)
    lr: float = 3e-4  # AdamW's peak learning rate for the weights: short warm-up, then cosine decay
    weight_decay: float = 0.0
    theta_lr: float = 0.05  # projected SGD step on the thetas (constant)
    theta_init: float = 0.9  # every gate's keep probability at the start
    # The regulariser (section 5): keeping block b costs block_cost * params_b / mean params per sample, in the
    # loss's units (nats), plus theta_b * ||w_b||^2 / (2 prior_std^2 N) from the Gaussian prior of its weights.
    block_cost: float = 0.05
    prior_std: float = 1.0
    data_size: int | None = None  # N of the prior term; None: the training samples
    threshold: float = 0.05  # theta under this ...
    patience: int = 20  # ... for this many consecutive steps: the block is pruned
    temperature: float = 4.0  # of the distillation KL (no labels)
    augment: bool = True  # random crop and flip for image inputs (as healing)
    holdout: float = 0.1  # share of the data held back for the evaluations
    evaluations: int = 10  # evaluations (thetas logged, held-back loss and accuracy/agreement) over the run
    from_scratch: bool = False  # re-initialise the weights (kaiming for conv/linear, zero biases) first
    speedup: float | None = None  # stop pruning once the measured speed-up reaches this
    device: str = "cpu"
    seed: int = 0

    DEFAULT_STEPS = 1000

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise OnnxPruneError("give --steps or --epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise OnnxPruneError("train-prune needs at least one step")
        if self.lr <= 0 or self.theta_lr <= 0 or self.batch < 2 or self.temperature <= 0:
            raise OnnxPruneError("the learning rates and temperature must be positive, the batch at least 2 "
                                 "(the gate gradient compares the samples of a batch)")
        if not 0 < self.theta_init <= 1 or not 0 <= self.threshold < 1 or self.patience < 1:
            raise OnnxPruneError("--theta-init is in (0, 1], --prune-threshold in [0, 1), --patience at least 1")
        if self.block_cost < 0 or self.prior_std <= 0:
            raise OnnxPruneError("--block-cost must be at least 0 and --prior-std positive")
        if not 0 < self.holdout < 1:
            raise OnnxPruneError(f"--holdout is a share of the data between 0 and 1, not {self.holdout}")
        if self.speedup is not None and self.speedup <= 1.0:
            raise OnnxPruneError(f"--speedup is a factor above 1 (1.5 = 1.5x faster), not {self.speedup}")
        if self.device not in ("cpu", "cuda"):
            raise OnnxPruneError(f"--device is cpu or cuda, not {self.device!r}")


@dataclass(frozen=True)
class RayOptions:
    """Scale-out on a Ray cluster (``--ray`` and its group; docs/scale-out.md): importance rows as Ray tasks, latency
    rows on Ray actors, healing on Ray Train workers. Without an address nothing touches Ray."""

    address: str | None = None  # None: no Ray; "auto": the running cluster, else a local one; "local"; HOST:PORT
    resource: str | None = None  # a custom resource every latency actor needs (edge devices joined with it)
    workers: int = 2  # healing workers / latency actors
    max_retries: int = 3  # a task retried, an actor restarted, this many times after its process dies

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise OnnxPruneError(f"--ray-workers needs at least 1 worker, not {self.workers}")
        if self.max_retries < 0:
            raise OnnxPruneError(f"Ray's retries are at least 0, not {self.max_retries}")
        if self.address is not None and not self.address.strip():
            raise OnnxPruneError("--ray takes auto, local or a cluster's address (HOST:PORT, ray://HOST:PORT)")
        if self.resource is not None and not self.resource.strip():
            raise OnnxPruneError("--ray-resource needs the name of a custom resource")


def connected_to_ray() -> bool:
    """Whether this runs inside ``onnxprune.scaleout.cluster.connect`` (``--ray``), where scoring and latency rows go
    to Ray. That module is imported only when a run asks for Ray, so a run without it never imports Ray to find out."""
    cluster = sys.modules.get("onnxprune.scaleout.cluster")
    return cluster is not None and cluster.current() is not None


# flag -> (the option object's attribute, the methods it applies to)
_METHOD_FLAGS = {
    "--remove-blocks": ("remove_blocks", {"slp", "sglp"}),
    "--macs-reduction": ("macs_reduction", {"slp"}),
    "--min-blocks-per-stage": ("min_blocks_per_stage", {"slp"}),
    "--one-shot": ("one_shot", {"slp"}),
    "--scope": ("scope", {"layermerge"}),
    "--latency-table": ("table", {"layermerge"}),
    "--pareto": ("pareto", {"layermerge"}),
    "--segments": ("segments", {"sglp"}),
    "--plot": ("plot", {"sglp"}),
}


def check_method(target: TargetOptions, scoring: ScoringOptions, latency: LatencyOptions,
                 output: OutputOptions) -> None:
    """Refuse a combination that would silently ignore something the caller asked for."""
    if target.method not in METHODS:
        raise OnnxPruneError(f"unknown method {target.method!r}; available: {', '.join(METHODS)}")
    stops = [s for s in ("speedup", "remove_blocks", "macs_reduction") if getattr(target, s) is not None]
    if len(stops) != 1:
        raise OnnxPruneError("give exactly one stop criterion: --remove-blocks N, --macs-reduction F or --speedup X")
    if target.method == "layermerge" and target.speedup is None:
        raise OnnxPruneError("--method layermerge needs a --speedup target")
    if target.segments is not None and target.segments < 1:
        raise OnnxPruneError(f"--segments needs at least 1 segment, not {target.segments}")
    if target.remove_blocks is not None and target.remove_blocks < 1:
        raise OnnxPruneError(f"--remove-blocks needs at least 1 block, not {target.remove_blocks}")
    if target.speedup is not None and target.speedup <= 1.0:
        raise OnnxPruneError(f"--speedup is a factor above 1 (1.5 = 1.5x faster), not {target.speedup}")
    if scoring.scope is not None and scoring.scope not in SCOPES:
        raise OnnxPruneError(f"--scope is global or local, not {scoring.scope!r}")
    given = {**_given(target), **_given(scoring), **_given(latency), **_given(output)}
    for flag, (attribute, methods) in _METHOD_FLAGS.items():
        if attribute in given and target.method not in methods:
            raise OnnxPruneError(f"{flag} does not apply to --method {target.method} (only to {', '.join(sorted(methods))})")
    if target.speedup is None and latency != LatencyOptions(backend=latency.backend, threads=latency.threads):
        raise OnnxPruneError("--latency-batch, --latency-table and --rounds need --speedup: nothing is timed without it")


def _given(options: object) -> dict:
    """The attributes of ``options`` set to something other than None or False."""
    return {f.name: getattr(options, f.name) for f in fields(options)
            if getattr(options, f.name) is not None and getattr(options, f.name) is not False}
