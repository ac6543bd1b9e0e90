"""Healing: train a pruned model back towards its original, from unlabelled data (docs/algorithms.md, section
"Healing").

The recipe follows PRACTISE (Wang & Wu, CVPR 2023): the pruned model (the student, a trainable copy of its
ONNX graph, ``onnxprune.train.bridge``) learns to reproduce the original's (the teacher's, run by onnxruntime)
feature map before global pooling, plus knowledge distillation on the logits (Hinton et al. 2015):

    loss = feature_weight * mean((s_f - t_f)^2) / mean(t_f^2)          (relative MSE at the feature map)
         + logit_weight * T^2 * KL(softmax(t_z / T) || softmax(s_z / T))
         [+ block_weight * mean over b of mean((s_b - t_b)^2) / mean(t_b^2), with match_blocks]
         [+ cross-entropy(s_z, labels), with use_labels]

With ``match_blocks``, the outputs b of the original's residual blocks that the pruned model still computes
(under the same name and shape) are matched too, as hints (FitNets, Romero et al., ICLR 2015): a pruning keeps
the names of what it leaves, and a repair map names its output after the original's tensor it stands for.

AdamW (exported graphs have BatchNorm folded into the convs, which makes plain SGD at PRACTISE's rate diverge)
with a linear warm-up and cosine decay; with ``ema``, an exponential moving average of the weights (Polyak &
Juditsky 1992; as in model-EMA training recipes) is what is evaluated and kept. The teacher sees the same
augmented batch as the student. A held-back share of the data measures agreement with the teacher (top-1 match)
before and during healing; the best checkpoint, the unhealed model included, is the one kept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError, UnavailableBackend
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.options import HealingOptions
from onnxprune.progress import progress
from onnxprune.runtime.capture import pooled_feature, with_outputs
from onnxprune.runtime.session import create_session
from onnxprune.train.bridge import GraphModule, write_back

log = logging.getLogger(__name__)

WARMUP_SHARE = 0.05  # of the steps, at most WARMUP_MAX
WARMUP_MAX = 100


@dataclass
class Split:
    """The data split into a training part and a held-back part (indices into the data set)."""

    train: np.ndarray
    held_back: np.ndarray


@dataclass
class HealResult:
    model: onnx.ModelProto  # the healed model (the unhealed one when no checkpoint beat it)
    split: Split  # which samples trained and which were held back
    record: dict = field(default_factory=dict)  # what healing did, for the plan and the report


def split_data(n: int, holdout: float, seed: int) -> Split:
    """A seeded split: ``holdout`` of the ``n`` samples held back (at least one), the rest for training."""
    if n < 2:
        raise OnnxPruneError(f"healing needs at least 2 samples (some to train on, some held back), not {n}")
    order = np.random.default_rng(seed).permutation(n)
    held = min(n - 1, max(1, round(holdout * n)))
    return Split(train=np.sort(order[held:]), held_back=np.sort(order[:held]))


def image_axes(array: np.ndarray) -> tuple[int, int] | None:
    """The (height, width) axes of a batch of images (N, C, H, W) or (N, H, W, C); None for other inputs."""
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
        return None
    if array.shape[1] in (1, 3, 4) and array.shape[2] >= 8 and array.shape[3] >= 8:
        return 2, 3
    if array.shape[3] in (1, 3, 4) and array.shape[1] >= 8 and array.shape[2] >= 8:
        return 1, 2
    return None


def augment(batch: np.ndarray, axes: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random crop of each image from its zero-padded copy (padding 1/8 of the size) and random horizontal flip."""
    h_axis, w_axis = axes
    h, w = batch.shape[h_axis], batch.shape[w_axis]
    ph, pw = max(1, h // 8), max(1, w // 8)
    pad = [(0, 0)] * batch.ndim
    pad[h_axis], pad[w_axis] = (ph, ph), (pw, pw)
    padded = np.pad(batch, pad)
    out = np.empty_like(batch)
    for i in range(len(batch)):
        dy, dx = rng.integers(0, 2 * ph + 1), rng.integers(0, 2 * pw + 1)
        window = [i, slice(None), slice(None), slice(None)]
        window[h_axis], window[w_axis] = slice(dy, dy + h), slice(dx, dx + w)
        image = padded[tuple(window)]
        out[i] = np.flip(image, axis=w_axis - 1) if rng.random() < 0.5 else image
    return out


def mixup(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each sample blended with another of the batch, at a uniform random weight (mixup, Zhang et al. 2018; for
    distillation, where the teacher labels the blend itself: Beyer et al., CVPR 2022, "function matching")."""
    weight = rng.random(len(batch)).astype(batch.dtype).reshape(-1, *([1] * (batch.ndim - 1)))
    return weight * batch + (1 - weight) * batch[rng.permutation(len(batch))]


def schedule(step: int, steps: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up over WARMUP_SHARE of the steps, then cosine to zero."""
    warmup = max(1, min(WARMUP_MAX, round(WARMUP_SHARE * steps)))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def step_count(options, train_samples: int, batch: int) -> int:
    """Optimiser steps of a training run: ``options.steps``, else ``options.epochs`` over ``train_samples`` in
    batches of ``batch``, else the options' DEFAULT_STEPS (HealingOptions and GateTrainingOptions alike)."""
    if options.steps is not None:
        return options.steps
    if options.epochs is not None:
        return max(1, math.ceil(options.epochs * train_samples / batch))
    return options.DEFAULT_STEPS


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], feature_scale: float,
                      options: HealingOptions, labels: torch.Tensor | None = None,
                      logit_scale: float | None = None, block_scales: Sequence[float] = ()) -> torch.Tensor:
    """The healing loss (module docstring) of ``[logits, feature, *block outputs]``; the feature term is left
    out when the feature is the logits themselves (a single output), the logit term is a relative MSE for an
    output that is not (batch, classes): relative to ``logit_scale``, the teacher's mean square there (None:
    this batch's; a worker of a distributed run passes the whole batch's, so that its slice's loss averages
    with the others' to the loss of the whole batch). Block outputs are relative to ``block_scales``, the
    teacher's mean squares there. Outputs of different shapes (a damaged pruned model) are refused."""
    for k, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            what = ("output", "feature map")[k] if k < 2 else "residual block output"
            raise OnnxPruneError(f"the pruned model's {what} has shape {list(s.shape)} where the original's has "
                                 f"{list(t.shape)}: healing matches the two, so they must be alike")
    s_logits, t_logits = student[0], teacher[0]
    if s_logits.ndim == 2:
        t = options.temperature
        kd = F.kl_div(F.log_softmax(s_logits / t, dim=1), F.log_softmax(t_logits / t, dim=1), log_target=True,
                      reduction="batchmean") * t * t
    else:
        scale = t_logits.square().mean().clamp_min(1e-12) if logit_scale is None else max(logit_scale, 1e-12)
        kd = F.mse_loss(s_logits, t_logits) / scale
    loss = options.logit_weight * kd
    if len(student) > 1:
        loss = loss + options.feature_weight * F.mse_loss(student[1], teacher[1]) / feature_scale
    if len(student) > 2:
        hints = [F.mse_loss(s, t) / scale for s, t, scale in zip(student[2:], teacher[2:], block_scales)]
        loss = loss + options.block_weight * torch.stack(hints).mean()
    if labels is not None:
        loss = loss + F.cross_entropy(s_logits, labels)
    return loss


def check_labels(labels: np.ndarray | None, model: onnx.ModelProto) -> None:
    """Refuse labels that are no class of ``model``'s logits (its first output, when it is (batch, classes) with a
    fixed number of classes): cross-entropy cannot take them."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if labels is None or not len(labels) or len(dims) != 2 or not dims[1].HasField("dim_value"):
        return
    classes = dims[1].dim_value
    if labels.min() < 0 or labels.max() >= classes:
        raise OnnxPruneError(f"the data's labels run from {labels.min()} to {labels.max()}, but the model's "
                             f"{classes} classes are 0 to {classes - 1}")


@dataclass
class HealSetup:
    """What a healing run works out once, before its first step, besides the models and the data: which outputs
    are matched, the split, the batch and the step count, the augmentation, and the teacher's outputs that do not
    change (on the held-back part; on the whole data set when the inputs are never augmented). ``heal`` makes it
    in-process; Ray healing (onnxprune.scaleout.heal) makes it on the driver and ships it to its workers."""

    outputs_s: list[str]  # the student's [first output, feature map, *matched block outputs]
    outputs_t: list[str]  # the teacher's
    split: Split
    batch: int  # samples per step (the whole batch, over all workers)
    steps: int
    labels: np.ndarray | None  # the data's labels, when cross-entropy uses them
    input_names: list[str]
    axes: tuple[int, int] | None  # image axes when the batches are augmented
    blend: bool  # mixup on top of the augmentation
    channels_last: bool  # NCHW images: the student's convs run channels-last
    held: Dataset  # the held-back samples
    held_teacher: np.ndarray  # the teacher's first output on them
    cached: list[np.ndarray] | None  # the teacher's outputs on the whole data set (no augmentation), else None

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def draw(self, data: Dataset, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The rows of the next batch and its (augmented) inputs: the whole batch, whatever part of it a
        worker trains on, so that every worker's ``rng`` draws the same."""
        rows = rng.choice(self.split.train, size=self.batch, replace=len(self.split.train) < self.batch)
        feeds = {k: data.inputs[k][rows] for k in self.input_names}
        if self.axes is not None:
            feeds[self.input_names[0]] = augment(feeds[self.input_names[0]], self.axes, rng)
            if self.blend:
                feeds[self.input_names[0]] = mixup(feeds[self.input_names[0]], rng)
        return rows, feeds

    def targets(self, teacher, rows: np.ndarray, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The teacher's outputs for a batch: cached ones, else a run of ``teacher`` (a session that returns
        ``outputs_t``) on the batch."""
        return [c[rows] for c in self.cached] if self.cached is not None else teacher.run(feeds, self.outputs_t)


def prepare(teacher_model: onnx.ModelProto, teacher, data: Dataset, options: HealingOptions, outputs_s: list[str],
            outputs_t: list[str]) -> HealSetup:
    """The ``HealSetup`` of healing on ``data``; ``teacher`` is a session of ``teacher_model`` that returns
    ``outputs_t``, run here on the held-back samples (and on all of them when nothing is augmented)."""
    split = split_data(len(data), options.holdout, options.seed)
    batch = data.static_batch or options.batch
    labels = data.labels if options.use_labels else None
    check_labels(labels, teacher_model)
    input_names = list(data.inputs)
    axes = image_axes(data.inputs[input_names[0]]) if options.augment and len(input_names) == 1 else None
    if options.augment and axes is None:
        log.info("heal: note: the input is not a batch of images; no augmentation")
    blend = axes is not None and options.blends(len(split.train)) and labels is None  # a blend has no label
    channels_last = image_axes(data.inputs[input_names[0]]) == (2, 3)  # NCHW images: channels-last convs train faster
    held = data.subset(split.held_back)
    held_teacher = _teacher_outputs(teacher, held, batch, outputs_t[:1])[0]
    # the same inputs every time: the teacher's outputs once (not the block outputs: too many to keep)
    cached = None if axes is not None or len(outputs_t) > 2 else _teacher_outputs(teacher, data, batch, outputs_t)
    steps = step_count(options, len(split.train), batch)
    return HealSetup(outputs_s, outputs_t, split, batch, steps, labels, input_names, axes, blend, channels_last,
                     held, held_teacher, cached)


class HealingDiverged(OnnxPruneError):
    """The healing loss is no longer finite."""


class HealLoop:
    """The optimisation and the bookkeeping of a healing run, step by step: AdamW with its schedule, the loss
    (``distillation_loss``), the held-back evaluations and the best checkpoint (lowest held-back KL). ``heal``
    runs one in-process; each worker of Ray healing (onnxprune.scaleout.heal) runs one on its slice of every
    batch, with ``forward`` the student's DistributedDataParallel wrapper (which averages the gradients) and
    ``mean`` the average of a number over the workers (the identity in-process): the loss's scales and the loss
    itself are those of the whole batch."""

    def __init__(self, student: GraphModule, setup: HealSetup, options: HealingOptions, device: torch.device,
                 forward: Callable | None = None, mean: Callable[[float], float] | None = None,
                 started: float | None = None) -> None:
        self.student, self.setup, self.options, self.device = student, setup, options, device
        self.forward = forward or student
        self.mean = mean or (lambda x: x)
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: schedule(s, setup.steps))
        self.every = max(1, setup.steps // max(1, options.evaluations))
        self.scales: list[float] | None = None  # the teacher's mean squares at the feature map and block outputs
        # the moving average of the weights (``options.ema``), and how many steps it has taken in
        self.average: dict[str, torch.Tensor] | None = None
        self.averaged_steps = 0
        self.losses: list[float] = []  # the whole batch's loss at each step
        self.step_seconds: list[float] = []  # wall time of each step (drawing the batch to the optimiser step)
        self.history: list[dict] = []
        self.best: dict = {}
        self.started = time.perf_counter() if started is None else started
        self.last_line = time.perf_counter()

    def evaluate(self) -> tuple[float, float]:
        """(top-1 agreement, KL) with the teacher on the held-back samples, now (of the averaged weights, with
        ``ema``)."""
        with self.weights_to_keep():
            return _held_back(self.student, self.setup.held, self.setup.held_teacher, self.setup.batch, self.device,
                              self.setup.layout)

    @contextlib.contextmanager
    def weights_to_keep(self):
        """The student holds, inside the block, the weights that are evaluated and kept: its own, or with ``ema``
        their moving average (its own weights come back after)."""
        if self.average is None:
            yield
            return
        own = copy.deepcopy(self.student.state_dict())
        self.student.load_state_dict(self.average)
        try:
            yield
        finally:
            self.student.load_state_dict(own)

    def update_average(self) -> None:
        """One step of the moving average, its decay ramped up over the first steps, min(ema, (1 + n) / (10 + n)),
        so that the unhealed weights fade out fast."""
        if self.options.ema is None:
            return
        weights = self.student.state_dict()
        self.averaged_steps += 1
        decay = min(self.options.ema, (1 + self.averaged_steps) / (10 + self.averaged_steps))
        with torch.no_grad():
            for k, v in weights.items():
                if v.is_floating_point():
                    self.average[k].lerp_(v, 1 - decay)

    def begin(self) -> tuple[float, float]:
        """Evaluate the unhealed student: step 0 of the history and the first best checkpoint."""
        agreement0, kl0 = self.evaluate()
        self.best = {"step": 0, "agreement": agreement0, "kl": kl0, "state": copy.deepcopy(self.student.state_dict())}
        if self.options.ema is not None:
            self.average = copy.deepcopy(self.best["state"])
        self.history = [{"step": 0, "agreement": agreement0, "kl": kl0}]
        self.student.train()
        return agreement0, kl0

    def step(self, step: int, data: Dataset, rng: np.random.Generator, teacher, part: slice = slice(None)) -> None:
        """One optimiser step on the ``part`` of the next batch (all of it in-process)."""
        began = time.perf_counter()
        setup, device = self.setup, self.device
        rows, feeds = setup.draw(data, rng)
        rows, feeds = rows[part], {k: v[part] for k, v in feeds.items()}
        targets = [torch.from_numpy(np.ascontiguousarray(t)).to(device) for t in setup.targets(teacher, rows, feeds)]
        if self.scales is None:
            self.scales = [max(self.mean(float(t.float().square().mean())), 1e-12) for t in targets[1:]] or [1.0]
        logit_scale = None if targets[0].ndim == 2 else self.mean(float(targets[0].float().square().mean()))
        y = torch.from_numpy(setup.labels[rows]).to(device) if setup.labels is not None else None
        out = self.forward({k: _tensor(v, device, setup.layout) for k, v in feeds.items()})
        loss = distillation_loss(out, targets, self.scales[0], self.options, y, logit_scale, self.scales[1:])
        value = self.mean(loss.item())
        if not math.isfinite(value):
            raise HealingDiverged(f"healing diverged at step {step} (loss {value}); try a lower --heal-lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.update_average()
        self.losses.append(value)
        self.step_seconds.append(time.perf_counter() - began)

    def due(self, step: int) -> bool:
        """Whether the held-back evaluation runs after ``step``."""
        return step % self.every == 0 or step == self.setup.steps

    def after_step(self, step: int) -> None:
        """The evaluation when it is due, else a progress line every 30 s."""
        if self.due(step):
            self.evaluation(step)
        else:
            self.progress_line(step)

    def evaluation(self, step: int) -> None:
        """Evaluate on the held-back samples; keep the checkpoint if it is the closest to the teacher so far."""
        agreement, kl = self.evaluate()
        self.student.train()
        loss = float(np.mean(self.losses[-self.every:]))
        self.history.append({"step": step, "agreement": agreement, "kl": kl, "loss": loss})
        if kl < self.best["kl"]:
            with self.weights_to_keep():
                self.best = {"step": step, "agreement": agreement, "kl": kl,
                             "state": copy.deepcopy(self.student.state_dict())}
        log.info(f"heal: step {step}/{self.setup.steps}  loss {loss:.4f}  held-back agreement "
                 f"{100 * agreement:.1f}%, KL {kl:.4f} (kept: step {self.best['step']})  "
                 f"{time.perf_counter() - self.started:.0f} s")
        self.last_line = time.perf_counter()

    def progress_line(self, step: int) -> None:
        if time.perf_counter() - self.last_line > 30:
            log.info(f"heal: step {step}/{self.setup.steps}  loss {np.mean(self.losses[-50:]):.4f}  "
                     f"{time.perf_counter() - self.started:.0f} s")
            self.last_line = time.perf_counter()

    def state_dict(self) -> dict:
        """Everything a resumed run needs to go on as if never stopped (with the caller's step and rng state)."""
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(), "scales": self.scales,
                "losses": self.losses, "step_seconds": self.step_seconds, "history": self.history, "best": self.best,
                "average": self.average, "averaged_steps": self.averaged_steps}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scales, self.losses = state["scales"], state["losses"]
        self.step_seconds = state["step_seconds"]
        self.history, self.best = state["history"], state["best"]
        self.average, self.averaged_steps = state["average"], state["averaged_steps"]


def heal_result(student_model: onnx.ModelProto, student: GraphModule, setup: HealSetup, options: HealingOptions,
                history: list[dict], best: dict, device: str, started: float,
                step_seconds: list[float]) -> HealResult:
    """The healed model (the best checkpoint's weights written into ``student_model``, or ``student_model`` itself
    when the unhealed model was the best) and the record of the run."""
    if best["step"]:
        student.load_state_dict(best["state"])
        healed = write_back(student_model, student.cpu().to(memory_format=torch.contiguous_format))
    else:
        healed = student_model
    labels, split, steps, batch = setup.labels, setup.split, setup.steps, setup.batch
    agreement0, kl0 = history[0]["agreement"], history[0]["kl"]
    record = {"method": "distillation from the original (PRACTISE-style feature MSE + logit KL)"
                        + (" + cross-entropy" if labels is not None else ""),
              "steps": steps, "epochs": steps * batch / len(split.train), "batch": batch, "lr": options.lr,
              "weight_decay": options.weight_decay, "temperature": options.temperature, "ema": options.ema,
              "feature_tensor": setup.outputs_s[1] if len(setup.outputs_s) > 1 else None,
              "teacher_feature_tensor": setup.outputs_t[1] if len(setup.outputs_t) > 1 else None,
              "matched_block_outputs": setup.outputs_s[2:],
              "labels": labels is not None, "augment": setup.axes is not None,
              "mixup": setup.blend, "device": device,
              "train_samples": int(len(split.train)), "held_back_samples": int(len(split.held_back)),
              "held_back_agreement_before": agreement0, "held_back_agreement_after": best["agreement"],
              "held_back_kl_before": kl0, "held_back_kl_after": best["kl"],
              "best_step": best["step"], "seconds": time.perf_counter() - started,
              # the median wall time of a step (the first, with its warm-up, included), evaluations left out
              "seconds_per_step": float(np.median(step_seconds)) if step_seconds else None,
              "history": history}
    if best["step"] == 0:
        record["note"] = "no checkpoint came closer to the original than the unhealed model: it is kept as it was"
    return HealResult(healed, split, record)


def heal(student_model: onnx.ModelProto, teacher_model: onnx.ModelProto, data: Dataset,
         options: HealingOptions = HealingOptions(), provider: str = "auto") -> HealResult:
    """Heal ``student_model`` (a pruned model) against ``teacher_model`` (its original) on ``data``."""
    started = time.perf_counter()
    if options.device == "cuda" and not torch.cuda.is_available():
        raise UnavailableBackend("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)

    outputs_s, outputs_t = _heal_outputs(student_model, teacher_model, options)
    student = GraphModule(student_model, outputs_s).to(device)
    teacher = create_session(with_outputs(teacher_model, outputs_t), provider)
    setup = prepare(teacher_model, teacher, data, options, outputs_s, outputs_t)
    if setup.channels_last:
        student = student.to(memory_format=torch.channels_last)
    loop = HealLoop(student, setup, options, device, started=started)
    agreement0, _ = loop.begin()
    log.info(f"heal: {len(setup.split.train)} samples to train on, {len(setup.split.held_back)} held back; "
             f"{setup.steps} steps of {setup.batch} on {device.type}; held-back agreement before: "
             f"{100 * agreement0:.1f}%")
    for step in progress(range(1, setup.steps + 1), desc="healing"):
        loop.step(step, data, rng, teacher)
        loop.after_step(step)
    return heal_result(student_model, student, setup, options, loop.history, loop.best, device.type, started,
                       loop.step_seconds)


def _heal_outputs(student: onnx.ModelProto, teacher: onnx.ModelProto,
                  options: HealingOptions) -> tuple[list[str], list[str]]:
    """[first output, feature map, *matched block outputs] of the student and of the teacher (the feature left
    out where it is the first output itself; block outputs only with ``options.match_blocks``)."""
    feature = options.feature_tensor
    if feature is not None:
        for model, who in ((student, "pruned model"), (teacher, "original")):
            if feature not in {t for n in model.graph.node for t in n.output}:
                raise OnnxPruneError(f"--feature-tensor {feature!r} is not a tensor of the {who}")
    pairs = []
    for model in (student, teacher):
        first = model.graph.output[0].name
        chosen = feature or pooled_feature(model)
        pairs.append([first] if chosen == first else [first, chosen])
    if len(pairs[0]) != len(pairs[1]):
        pairs = [[p[0]] for p in pairs]
    if options.match_blocks and len(pairs[0]) == 2:
        blocks = kept_block_outputs(student, teacher, exclude=set(pairs[0]) | set(pairs[1]))
        pairs = [p + blocks for p in pairs]
    return pairs[0], pairs[1]


def kept_block_outputs(student: onnx.ModelProto, teacher: onnx.ModelProto,
                       exclude: Collection[str] = ()) -> list[str]:
    """The outputs of ``teacher``'s residual blocks that ``student`` computes under the same name and with the same
    shape, in the teacher's order: what a pruning left (it keeps names) or a repair map stands for (it takes the
    name of the original's tensor it approximates)."""
    shapes_s, shapes_t = _shapes(student), _shapes(teacher)
    names = [b.output for b in analyze_model(teacher).residual_blocks]
    return [n for n in names if n not in exclude and n in shapes_s and shapes_s[n] == shapes_t.get(n)]


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Every node output's inferred shape (fixed dims as ints, symbolic ones by name); unknown shapes left out."""
    inferred = onnx.ModelProto()
    inferred.CopyFrom(model)
    infer_shapes(inferred)  # the project's shape inference (graph/io.py), on a copy: it fills value_info in place
    produced = {t for n in model.graph.node for t in n.output}
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.name in produced and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                                      for d in info.type.tensor_type.shape.dim)
    return shapes


def _teacher_outputs(teacher, data: Dataset, batch: int, names: list[str]) -> list[np.ndarray]:
    """The teacher's ``names`` outputs over the whole data set, in its order."""
    runs = [[o[:b.count] for o in teacher.run(b.feeds, names)] for b in data.batches(batch)]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(names))]


def _tensor(array: np.ndarray, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    tensor = torch.from_numpy(array).to(device)
    return tensor.contiguous(memory_format=layout) if tensor.ndim == 4 else tensor


@torch.no_grad()
def _held_back(student: GraphModule, data: Dataset, teacher_logits: np.ndarray, batch: int,
               device: torch.device, layout: torch.memory_format) -> tuple[float, float]:
    """(top-1 agreement, mean KL(teacher || student)) of the student on the held-back data."""
    student.eval()
    logits = []
    for b in data.batches(batch):
        out = student({k: _tensor(v, device, layout) for k, v in b.feeds.items()})[0]
        logits.append(out[:b.count].float().cpu())
    s = torch.cat(logits).reshape(len(teacher_logits), -1)
    t = torch.from_numpy(teacher_logits).float().reshape(len(teacher_logits), -1)
    agreement = float((s.argmax(1) == t.argmax(1)).float().mean())
    kl = float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean"))
    return agreement, kl
