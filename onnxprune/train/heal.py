"""Healing: train a pruned model back towards its original, from unlabelled data (docs/algorithms.md, section
"Healing").

The recipe follows PRACTISE (Wang & Wu, CVPR 2023): the pruned model (the student, a trainable copy of its
ONNX graph, ``onnxprune.train.bridge``) learns to reproduce the original's (the teacher's, run by onnxruntime)
feature map before global pooling, plus knowledge distillation on the logits (Hinton et al. 2015):

    loss = feature_weight * mean((s_f - t_f)^2) / mean(t_f^2)          (relative MSE at the feature map)
         + logit_weight * T^2 * KL(softmax(t_z / T) || softmax(s_z / T))
         [+ cross-entropy(s_z, labels), with use_labels]

AdamW (exported graphs have BatchNorm folded into the convs, which makes plain SGD at PRACTISE's rate diverge)
with a linear warm-up and cosine decay. The teacher sees the same augmented batch as the student. A held-back
share of the data measures agreement with the teacher (top-1 match) before and during healing; the best
checkpoint, the unhealed model included, is the one kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError, UnavailableBackend
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
                      options: HealingOptions, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The healing loss (module docstring) of ``[logits, feature]`` outputs; the feature term is left out when
    the feature is the logits themselves (a single output), the logit term is a relative MSE for an output
    that is not (batch, classes). Outputs of different shapes (a damaged pruned model) are refused."""
    for s, t, what in zip(student, teacher, ("output", "feature map")):
        if s.shape != t.shape:
            raise OnnxPruneError(f"the pruned model's {what} has shape {list(s.shape)} where the original's has "
                                 f"{list(t.shape)}: healing matches the two, so they must be alike")
    s_logits, t_logits = student[0], teacher[0]
    if s_logits.ndim == 2:
        t = options.temperature
        kd = F.kl_div(F.log_softmax(s_logits / t, dim=1), F.log_softmax(t_logits / t, dim=1), log_target=True,
                      reduction="batchmean") * t * t
    else:
        kd = F.mse_loss(s_logits, t_logits) / t_logits.square().mean().clamp_min(1e-12)
    loss = options.logit_weight * kd
    if len(student) > 1:
        loss = loss + options.feature_weight * F.mse_loss(student[1], teacher[1]) / feature_scale
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


def heal(student_model: onnx.ModelProto, teacher_model: onnx.ModelProto, data: Dataset,
         options: HealingOptions = HealingOptions(), provider: str = "auto") -> HealResult:
    """Heal ``student_model`` (a pruned model) against ``teacher_model`` (its original) on ``data``."""
    started = time.perf_counter()
    if options.device == "cuda" and not torch.cuda.is_available():
        raise UnavailableBackend("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)

    outputs_s, outputs_t = _heal_outputs(student_model, teacher_model, options.feature_tensor)
    student = GraphModule(student_model, outputs_s).to(device)
    layout = torch.contiguous_format
    teacher = create_session(with_outputs(teacher_model, outputs_t), provider)
    names = outputs_t

    split = split_data(len(data), options.holdout, options.seed)
    batch = data.static_batch or options.batch
    labels = data.labels if options.use_labels else None
    check_labels(labels, teacher_model)
    input_names = list(data.inputs)
    axes = image_axes(data.inputs[input_names[0]]) if options.augment and len(input_names) == 1 else None
    if options.augment and axes is None:
        log.info("heal: note: the input is not a batch of images; no augmentation")
    blend = axes is not None and options.mixup and labels is None  # a blend has no label of its own
    if image_axes(data.inputs[input_names[0]]) == (2, 3):  # NCHW images: channels-last convs train faster
        layout = torch.channels_last
        student = student.to(memory_format=layout)
    held = data.subset(split.held_back)
    held_teacher = _teacher_outputs(teacher, held, batch, names[:1])[0]
    cached = None if axes is not None else _teacher_outputs(teacher, data, batch, names)  # same inputs every time
    steps = step_count(options, len(split.train), batch)

    def evaluate() -> tuple[float, float]:
        return _held_back(student, held, held_teacher, batch, device, layout)

    agreement0, kl0 = evaluate()
    best = {"step": 0, "agreement": agreement0, "kl": kl0, "state": copy.deepcopy(student.state_dict())}
    log.info(f"heal: {len(split.train)} samples to train on, {len(split.held_back)} held back; {steps} steps of "
             f"{batch} on {device.type}; held-back agreement before: {100 * agreement0:.1f}%")
    optimizer = torch.optim.AdamW(student.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, steps))
    every = max(1, steps // max(1, options.evaluations))
    feature_scale, losses, history = None, [], [{"step": 0, "agreement": agreement0, "kl": kl0}]
    last_line = time.perf_counter()
    student.train()
    for step in progress(range(1, steps + 1), desc="healing"):
        rows = rng.choice(split.train, size=batch, replace=len(split.train) < batch)
        feeds = {k: data.inputs[k][rows] for k in input_names}
        if axes is not None:
            feeds[input_names[0]] = augment(feeds[input_names[0]], axes, rng)
            if blend:
                feeds[input_names[0]] = mixup(feeds[input_names[0]], rng)
        outputs = [c[rows] for c in cached] if cached is not None else teacher.run(feeds, names)
        targets = [torch.from_numpy(np.ascontiguousarray(t)).to(device) for t in outputs]
        if feature_scale is None:
            feature_scale = float(targets[-1].float().square().mean().clamp_min(1e-12))
        y = torch.from_numpy(labels[rows]).to(device) if labels is not None else None
        out = student({k: _tensor(v, device, layout) for k, v in feeds.items()})
        loss = distillation_loss(out, targets, feature_scale, options, y)
        if not torch.isfinite(loss):
            raise OnnxPruneError(f"healing diverged at step {step} (loss {loss.item()}); try a lower --heal-lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            agreement, kl = evaluate()
            student.train()
            history.append({"step": step, "agreement": agreement, "kl": kl, "loss": float(np.mean(losses[-every:]))})
            if kl < best["kl"]:
                best = {"step": step, "agreement": agreement, "kl": kl, "state": copy.deepcopy(student.state_dict())}
            log.info(f"heal: step {step}/{steps}  loss {np.mean(losses[-every:]):.4f}  held-back agreement "
                     f"{100 * agreement:.1f}%, KL {kl:.4f} (kept: step {best['step']})  {time.perf_counter() - started:.0f} s")
            last_line = time.perf_counter()
        elif time.perf_counter() - last_line > 30:
            log.info(f"heal: step {step}/{steps}  loss {np.mean(losses[-50:]):.4f}  {time.perf_counter() - started:.0f} s")
            last_line = time.perf_counter()

    student.load_state_dict(best["state"])
    healed = write_back(student_model, student.cpu().to(memory_format=torch.contiguous_format)) if best["step"] \
        else student_model
    record = {"method": "distillation from the original (PRACTISE-style feature MSE + logit KL)"
                        + (" + cross-entropy" if labels is not None else ""),
              "steps": steps, "epochs": steps * batch / len(split.train), "batch": batch, "lr": options.lr,
              "weight_decay": options.weight_decay, "temperature": options.temperature,
              "feature_tensor": outputs_s[1] if len(outputs_s) > 1 else None,
              "teacher_feature_tensor": outputs_t[1] if len(outputs_t) > 1 else None,
              "labels": labels is not None, "augment": axes is not None,
              "mixup": blend, "device": device.type,
              "train_samples": int(len(split.train)), "held_back_samples": int(len(split.held_back)),
              "held_back_agreement_before": agreement0, "held_back_agreement_after": best["agreement"],
              "held_back_kl_before": kl0, "held_back_kl_after": best["kl"],
              "best_step": best["step"], "seconds": time.perf_counter() - started, "history": history}
    if best["step"] == 0:
        record["note"] = "no checkpoint came closer to the original than the unhealed model: it is kept as it was"
    return HealResult(healed, split, record)


def _heal_outputs(student: onnx.ModelProto, teacher: onnx.ModelProto, feature: str | None) -> tuple[list[str], list[str]]:
    """[first output, feature map] of the student and of the teacher (the feature left out where it is the
    first output itself)."""
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
    return pairs[0], pairs[1]


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
