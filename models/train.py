"""Train a reference model on CIFAR-10 and export it to ONNX (opset 17, dynamic batch), resumable from the ONNX file.

Usage (from the repository root; see models/README.md):
    python models/train.py resnet56 --epochs 24 --data ../shared/data/cifar10          # continue the schedule
    python models/train.py resnet56 --device cuda --time-budget 240 --out $OUT          # one cycle fitted to 240 s

Training resumes from what the repository holds, not from files on one machine: the weights come from the
shipped ONNX model (``--init``, default ``models/<name>.onnx``), whose BatchNorms were folded into the
convolutions at export; ``load_onnx_weights`` puts them back into the torch definition and ``recalibrate``
splits every folded convolution into a unit-variance convolution and a BatchNorm holding the measured
statistics, which leaves the network's function unchanged. The position in the learning-rate schedule
(cosine cycles with warm restarts) is recorded in the ONNX metadata (``onnxprune.training``), beside
``onnxprune.preprocess`` and ``onnxprune.labels``. SGD's momentum is not kept: it restarts from zero in each
run, a transient of about 1 / (1 - 0.9) = 10 steps.

The CIFAR-10 JPEG tarballs are decoded once into a uint8 cache (``--cache``) and kept decoded in memory (on the
GPU with ``--device cuda``); augmentation (random crop of the 4-pixel zero-padded image, horizontal flip) runs
vectorised on the training device; ``--cutout`` adds Cutout.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import io
import json
import math
import os
import platform
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.definitions import MODELS, OPTIMIZERS  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]
TRAINING_KEY = "onnxprune.training"
NORMS_KEY = "onnxprune.weight_norms"  # per output channel, the norm of each BN-followed convolution's weight
SCHEDULE = "cosine_restarts"  # each cycle: linear warm-up, then cosine from lr to 0 (Loshchilov & Hutter's SGDR)
T_MULT = 2  # a new cycle is twice as long as the last one unless --cycle says otherwise
# The shipped models trained before onnxprune.training existed: one cosine cycle each (models/logs, README).
LEGACY = {
    "resnet56": {"epochs": 24, "test_acc": 0.8787, "minutes": 112.5},
    "resnet20": {"epochs": 30, "test_acc": 0.8661, "minutes": 52.8},
    "mobilenetv2": {"epochs": 40, "test_acc": 0.8455, "minutes": 107.0},
}


# ---------------------------------------------------------------------------------------------- data


def _decode_jpegs(blobs: Sequence[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.uint8) for b in blobs])


def decode_split(tar_path: Path, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``<split>/<class>/NNNN.jpg`` members into (N, 32, 32, 3) uint8 images and int64 labels."""
    blobs, labels = [], []
    with tarfile.open(tar_path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-2] not in CLASSES:
                continue
            blobs.append(tar.extractfile(member).read())
            labels.append(CLASSES.index(parts[-2]))
    if workers <= 1:
        return _decode_jpegs(blobs), np.asarray(labels, dtype=np.int64)
    from concurrent.futures import ProcessPoolExecutor

    size = math.ceil(len(blobs) / workers)
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_decode_jpegs, [blobs[i : i + size] for i in range(0, len(blobs), size)]))
    return np.concatenate(parts), np.asarray(labels, dtype=np.int64)


def load_split(data_dir: Path, split: str, cache_dir: Path, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The decoded split, from the cache or decoded (and cached) from ``<data_dir>/<split>.tar.gz``."""
    cache = cache_dir / f"cifar10_{split}.npz"
    if cache.exists():
        return load_npz(cache)
    x, y = decode_split(data_dir / f"{split}.tar.gz", workers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = cache.with_suffix(".part.npz")
    np.savez(part, x=x, y=y)
    os.replace(part, cache)
    return x, y


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["x"], f["y"].astype(np.int64)


def head(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` examples (all when None): smoke runs on a few images."""
    return (x, y) if not limit else (x[:limit], y[:limit])


def spread(x: np.ndarray | torch.Tensor, n: int) -> np.ndarray | torch.Tensor:
    """``n`` rows evenly spaced through ``x`` (all when fewer): the splits are sorted by class, so their first rows
    are all airplanes."""
    return x[np.linspace(0, len(x) - 1, n).round().astype(np.int64)] if n < len(x) else x


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) that map uint8 pixels to normalised inputs, made once per device (no copy per step)."""
    scale = torch.tensor([1 / (255 * s) for s in STD], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device).view(1, 3, 1, 1)
    return scale, shift


def to_input(x_uint8_nhwc: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """Normalised float NCHW input; channels_last memory (what the permuted NHWC already is) unless told not."""
    scale, shift = _normalisation(x_uint8_nhwc.device)
    x = x_uint8_nhwc.permute(0, 3, 1, 2).float() * scale + shift
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip (NHWC uint8), one gather."""
    n, dev = batch.shape[0], batch.device
    padded = F.pad(batch, (0, 0, 4, 4, 4, 4))
    offsets = torch.randint(0, 9, (n, 2), generator=gen, device=dev)
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    ar = torch.arange(32, device=dev)
    rows = offsets[:, :1] + ar
    cols = offsets[:, 1:] + torch.where(flip[:, None], 31 - ar, ar)
    return padded[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries and Taylor, 2017, "Improved regularization of convolutional neural networks with cutout"):
    a size x size square of each normalised NCHW image, centred on a uniformly random pixel and clipped at the
    borders, is set to 0, the data set's mean colour."""
    n, _, h, w = x.shape
    dev = x.device
    top = torch.randint(0, h, (n, 1), generator=gen, device=dev) - size // 2
    left = torch.randint(0, w, (n, 1), generator=gen, device=dev) - size // 2
    rows = (torch.arange(h, device=dev) >= top) & (torch.arange(h, device=dev) < top + size)
    cols = (torch.arange(w, device=dev) >= left) & (torch.arange(w, device=dev) < left + size)
    return x * ~(rows[:, :, None] & cols[:, None, :])[:, None]  # keeps x's memory format, unlike masked_fill


def training_batches(x: torch.Tensor, n: int, batch: int, cutout_size: int, seed: int,
                     channels_last: bool = True) -> Iterator[torch.Tensor]:
    """``n`` training images (uint8 NHWC) spread over the split, shuffled, and augmented as training augments them
    (crop, flip, Cutout when ``cutout_size``), in normalised batches: BatchNorm statistics measured on these match
    the batch statistics that training sees. Plain images do not (Cutout alone shifts them), and the decoded splits
    are sorted by class, so unshuffled batches would each hold one class and a training-mode pass over them would
    measure within-class statistics."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    images = spread(x, n)
    images = images[torch.randperm(len(images), generator=gen, device=x.device)]
    for i in range(0, len(images), batch):
        inputs = to_input(augment(images[i : i + batch], gen), channels_last)
        yield cutout(inputs, cutout_size, gen) if cutout_size else inputs


# ------------------------------------------------------------------------------ ONNX -> torch weights


def module_path(node_name: str) -> str:
    """The torch module of an exported node: '/layers/layers.3/shortcut/shortcut.0/Conv' -> 'layers.3.shortcut.0'.

    The exporter's scope names repeat the parent's name in a container's children ('layers' / 'layers.3')."""
    parts: list[str] = []
    prev = ""
    for seg in node_name.strip("/").split("/")[:-1]:
        parts.append(seg[len(prev) + 1 :] if prev and seg.startswith(prev + ".") else seg)
        prev = seg
    return ".".join(parts)


def onnx_params(proto) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Module path -> (weight, bias) of every Conv and Gemm node, weights in torch's layout."""
    from onnx import numpy_helper

    if any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise ValueError("the graph has unfolded BatchNormalization nodes; train.py exports (and loads) them folded")
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    params: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        attrs = {a.name: a for a in node.attribute}
        weight = inits[node.input[1]]
        if node.op_type == "Gemm" and not (attrs.get("transB") and attrs["transB"].i == 1):
            weight = weight.T
        bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        params[module_path(node.name)] = (weight, bias)
    return params


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """Every convolution with the BatchNorm registered right after it (the one it feeds, in these definitions)."""
    named = list(model.named_modules())
    pairs = []
    for (name, module), (_, nxt) in zip(named, named[1:] + [("", None)]):
        if isinstance(module, nn.Conv2d):
            if not isinstance(nxt, nn.BatchNorm2d) or nxt.num_features != module.out_channels:
                raise ValueError(f"{name}: no BatchNorm2d follows the convolution")
            pairs.append((name, module, nxt))
    return pairs


@torch.no_grad()
def load_onnx_weights(model: nn.Module, proto) -> None:
    """Load an exported (BN-folded) model's weights: each folded convolution's weight goes into the convolution,
    its bias into the BatchNorm's shift, and the BatchNorm is otherwise the identity. Exact in eval mode; call
    ``recalibrate`` before training so that batch statistics match the running ones."""
    params = onnx_params(proto)
    modules = dict(model.named_modules())
    expected = {n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if set(params) != expected:
        raise ValueError(f"ONNX and definition differ: missing {sorted(expected - set(params))}, "
                         f"unexpected {sorted(set(params) - expected)}")
    bn_after = {name: bn for name, _, bn in conv_bn_pairs(model)}
    for name, (weight, bias) in params.items():
        module = modules[name]
        if tuple(module.weight.shape) != weight.shape:
            raise ValueError(f"{name}: ONNX weight {weight.shape}, definition {tuple(module.weight.shape)}")
        module.weight.copy_(torch.tensor(weight))
        if isinstance(module, nn.Linear):
            module.bias.copy_(torch.tensor(bias))
            continue
        bn = bn_after[name]
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(torch.tensor(bias) if bias is not None else torch.zeros_like(bn.bias))


@torch.no_grad()
def load_plain_weights(model: nn.Module, proto) -> None:
    """Load the weights of a model without BatchNorm (the ViT) from its export: a Linear's weight, stored transposed
    behind a MatMul (or a Gemm), through the node named after its module; any other parameter by its name, or by the
    Identity node of that name where the exporter shared equal initializers."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:  # equal initializers are shared: the others' names are Identity nodes of one
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    by_module = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
            weight = inits[node.input[1]]
            by_module[module_path(node.name) + ".weight"] = weight if transposed else weight.T
    for name, tensor in model.state_dict().items():
        value = by_module.get(name, inits.get(name))
        if value is None or tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: not in the ONNX model with shape {tuple(tensor.shape)}")
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def weight_norms(model: nn.Module) -> dict[str, list[float]]:
    """Per output channel, the L2 norm of each BN-followed convolution's weight (5 significant digits): what the
    export's folding loses, and what sets that weight's effective learning rate (lr / |w|^2, BatchNorm making the
    function blind to its scale)."""
    return {name: [float(f"{v:.5g}") for v in conv.weight.detach().double().flatten(1).norm(dim=1).tolist()]
            for name, conv, _ in conv_bn_pairs(model)}


def read_weight_norms(proto, model: nn.Module) -> dict[str, list[float]] | None:
    """The norms an export recorded (``NORMS_KEY``), checked against ``model``'s convolutions; None if it has none."""
    text = next((e.value for e in proto.metadata_props if e.key == NORMS_KEY), None)
    if text is None:
        return None
    norms = json.loads(text)
    expected = {name: conv.out_channels for name, conv, _ in conv_bn_pairs(model)}
    if {name: len(values) for name, values in norms.items()} != expected:
        raise ValueError(f"{NORMS_KEY} does not match the definition's convolutions")
    return norms


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[torch.Tensor],
                norms: dict[str, list[float]] | None = None) -> None:
    """Re-split every conv + BN pair without changing the eval-mode function: the folded convolution W'x + b' is
    measured on ``batches`` (mean mu, variance var per channel), then the convolution becomes W'/d, the BatchNorm's
    running statistics mu/d and var/d^2, its scale sqrt(var) (to eps) and its shift b' + mu, the original network's
    gamma and beta. Training-mode batch statistics then match the running ones if ``batches`` are drawn as training
    draws them (``training_batches``); on plain images they would not, and training would start from another
    function. d gives each output channel of W' back the norm ``norms`` recorded at export, and with it the weight's
    effective learning rate; without them d = sqrt(var), a unit-variance output (Kaiming init's scale), whose norm
    is arbitrary (models/README.md, "Resuming")."""
    pairs = conv_bn_pairs(model)
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name, _, _ in pairs}

    def hook(name: str) -> Callable:
        def record(_module, _inputs, out) -> None:
            z = out.detach().double()
            sums[name][0] = sums[name][0] + z.sum((0, 2, 3))
            sums[name][1] = sums[name][1] + (z * z).sum((0, 2, 3))
            sums[name][2] += z.numel() // z.shape[1]

        return record

    handles = [conv.register_forward_hook(hook(name)) for name, conv, _ in pairs]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, conv, bn in pairs:
        total, total_sq, count = sums[name]
        a = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()  # the current fold: W' = a W
        b_fold = bn.bias.double() - a * bn.running_mean.double()
        mean_z = total / count
        var_z = (total_sq / count - mean_z**2).clamp_min(0.0)
        mu, var = a * mean_z, a * a * var_z  # statistics of W'x
        folded = conv.weight.double() * a.view(-1, 1, 1, 1)  # W'
        d = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
        if norms is not None:
            target = torch.tensor(norms[name], dtype=torch.float64, device=d.device)
            norm = folded.flatten(1).norm(dim=1)
            d = torch.where((target > 0) & (norm > 0), norm / target, d)
        conv.weight.copy_((folded / d.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        bn.running_mean.copy_(mu / d)
        bn.running_var.copy_(var / (d * d))
        bn.weight.copy_(d * (var / (d * d) + bn.eps).sqrt())
        bn.bias.copy_(b_fold + mu)


# ------------------------------------------------------------------------------------ the schedule


def fresh_record(model_name: str, seed: int) -> dict:
    return {"format": 1, "model": model_name, "schedule": SCHEDULE, "t_mult": T_MULT, "epochs": 0, "cycle": None,
            "seed": seed, "optimizer": optimizer_note(), "history": []}


def optimizer_note(wd: float = 5e-4, name: str = "sgd") -> dict:
    if name == "adamw":
        return {"name": "adamw", "betas": [0.9, 0.999], "weight_decay": wd, "no_decay": "biases and norms",
                "state": "not kept (moments restart from zero in each run)"}
    return {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": wd, "no_decay": "biases and BN",
            "state": "not kept (momentum restarts from zero in each run)"}


def legacy_record(model_name: str) -> dict:
    """What the shipped models' logs say about the training they had before the metadata existed."""
    record = fresh_record(model_name, seed=0)
    legacy = LEGACY.get(model_name)
    if legacy:
        record["epochs"] = legacy["epochs"]
        record["cycle"] = {"index": 0, "length": legacy["epochs"], "done": legacy["epochs"], "lr": 0.1, "warmup": 1.0,
                           "batch": 128}
        record["history"] = [{"cycle": 0, "from": 0, "to": legacy["epochs"], "lr": 0.1, "batch": 128,
                              "device": "cpu: 2-core development machine", "minutes": legacy["minutes"],
                              "test_acc": legacy["test_acc"], "test_images": 10000,
                              "note": "before onnxprune.training; figures from models/logs"}]
    return record


def read_record(proto, model_name: str) -> dict:
    """The ``onnxprune.training`` record of an exported model, or the legacy one for files made before it."""
    for entry in proto.metadata_props:
        if entry.key == TRAINING_KEY:
            return json.loads(entry.value)
    return legacy_record(model_name)


def plan_cycle(record: dict, cycle: int | None, lr: float, warmup: float, batch: int) -> tuple[dict, bool]:
    """(the cycle this run trains in, whether it is new). An unfinished cycle continues with its own lr and length;
    else a new one starts, ``cycle`` epochs long (default: T_MULT times the last one)."""
    last = record.get("cycle")
    if last and last["done"] < last["length"]:
        return dict(last), False
    if cycle is None:
        if not last:
            raise ValueError("no schedule to continue: give --cycle (epochs of the new cosine cycle)")
        cycle = int(round(last["length"] * record.get("t_mult", T_MULT)))
    index = last["index"] + 1 if last else 0
    return {"index": index, "length": cycle, "done": 0, "lr": lr, "warmup": warmup, "batch": batch}, True


def lr_at(cycle: dict, position: float) -> float:
    """Learning rate at ``position`` epochs into ``cycle``: linear warm-up, then cosine down to 0. A cycle with
    ``swa_lr`` (stochastic weight averaging) goes down to ``swa_lr`` by its averaging start and stays there."""
    warm, peak = cycle["warmup"], cycle["lr"]
    if position < warm:
        return peak * position / warm
    floor, end = cycle.get("swa_lr", 0.0), averaging_start(cycle)
    if position >= end:
        return floor
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (position - warm) / (end - warm)))


def averaging_start(cycle: dict) -> float:
    """Cycle position (epochs) from which the weights are averaged: ``swa_start`` of the length; the end without
    SWA."""
    return cycle["length"] * cycle["swa_start"] if "swa_lr" in cycle else float(cycle["length"])


def add_to_average(average: dict[str, torch.Tensor] | None, model: nn.Module) -> dict[str, torch.Tensor]:
    """Running sum of the parameters (float32); its count is kept by the caller."""
    params = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    if average is None:
        return params
    for name, value in params.items():
        average[name] += value
    return average


@torch.no_grad()
def averaged_model(model: nn.Module, average: dict[str, torch.Tensor], count: int,
                   batches: Iterable[torch.Tensor]) -> nn.Module:
    """An eager copy of ``model`` holding the averaged weights, its BatchNorm statistics re-estimated by training-
    mode forward passes over ``batches`` (Izmailov et al. 2018, SWA: the averaged weights' activations differ from
    any single model's, so the running statistics are measured again; models/README.md)."""
    net = eager(copy.deepcopy(model))
    for name, p in net.named_parameters():
        p.copy_((average[name] / count).to(p.dtype))
    torch.optim.swa_utils.update_bn(batches, net)  # cumulative statistics over all batches, momenta restored
    return net.eval()


def fit_cycle(cycle: dict, epoch_seconds: float, seconds_left: float, cap: int) -> int:
    """Cycle length (epochs) that ends within ``seconds_left`` at ``epoch_seconds`` an epoch, at most ``cap``."""
    return max(cycle["done"] + 1, min(cap, cycle["done"] + int(seconds_left // max(epoch_seconds, 1e-9))))


REFITS = 3  # the first epochs timed after the warm-up; the fastest of them fits a new cycle to the time budget


def refit(cycle: dict, epoch_seconds: list[float], fit_after: int, seconds_left: float, cap: int, fitted: bool,
          averaging: bool) -> int | None:
    """The cycle length to fit to the time budget after this epoch, or None to keep the current one. It is fitted
    first after ``fit_after`` epochs, then refitted, longer only, from the fastest of the first ``REFITS`` epochs
    since, so that an epoch slowed by other work on the machine does not shorten the cycle for good (a cycle that
    slows down later is annealed by the clock instead); never once averaging has begun."""
    timed = epoch_seconds[fit_after - 1:]
    if not 1 <= len(timed) <= REFITS or (fitted and averaging):
        return None
    length = fit_cycle(cycle, min(timed) * 1.03, seconds_left, cap)
    return length if not fitted or length > cycle["length"] else None


def time_position(fitted: tuple[float, int], length: int, now: float, end: float) -> float:
    """Cycle position (epochs) that the clock alone gives: from the epoch at which the cycle was fitted, at its
    time, linearly to ``length`` at ``end``."""
    when, done = fitted
    return done + (length - done) * min(1.0, (now - when) / max(1e-9, end - when))


# ---------------------------------------------------------------------------------------- training


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere autocast only adds conversions."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def use_bf16(choice: str, device: torch.device) -> bool:
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


def make_optimizer(model: nn.Module, lr: float, wd: float, name: str = "sgd") -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the CNNs) or AdamW (the ViT); no weight decay on biases and norms."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def make_step(forward: Callable, opt: torch.optim.Optimizer, device: torch.device, bf16: bool) -> Callable:
    """One SGD step: step(inputs, targets, lr) -> the loss (a tensor, so that the GPU need not wait for it)."""

    def step(inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss = F.cross_entropy(forward(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def compiled(model: nn.Module, mode: str, sample: torch.Tensor | None = None, bf16: bool = False) -> Callable:
    """The model's training forward: eager ('off'), CUDA-graphed forward and backward ('graphs': captured now on
    ``sample``, seconds; the module's forward runs the graph in train mode only), or torch.compile'd (any other
    mode: compiled at the first step, about a minute for ResNet-56)."""
    if mode == "off":
        return model
    if mode == "graphs":
        # autocast's weight cache must be off around capture and replay (torch.cuda.make_graphed_callables' docs)
        with torch.autocast(sample.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            return torch.cuda.make_graphed_callables(model, (sample,))
    return torch.compile(model, mode=None if mode == "default" else mode)


def eager(model: nn.Module) -> nn.Module:
    """Undo 'graphs' (make_graphed_callables replaces the instance's forward); the plain module."""
    model.__dict__.pop("forward", None)
    return model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000, channels_last: bool = True) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(to_input(x[i : i + batch], channels_last)).float() for i in range(0, len(x), batch)])
    model.train()
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool = True) -> float:
    return float((predict(model, x, channels_last=channels_last).argmax(1) == y).float().mean())


def cpu_copy(model: nn.Module) -> nn.Module:
    """A float CPU copy, without the CUDA graphs (whose forward the copy would otherwise share)."""
    return eager(copy.deepcopy(model)).cpu().float()


def export(model: nn.Module, path: Path, metadata: dict[str, str], opset: int = 17) -> None:
    """Export a CPU float copy (BN folded by the exporter), names and dynamic batch as always, with ``metadata``."""
    import onnx

    model = cpu_copy(model).eval().to(memory_format=torch.contiguous_format)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model, (torch.randn(1, 3, 32, 32),), str(tmp), dynamo=False, opset_version=opset,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(tmp))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    part = path.with_suffix(".part.onnx")
    onnx.save(proto, str(part))
    os.replace(part, path)
    tmp.unlink()


def default_metadata() -> dict[str, str]:
    preprocess = {"input": "input", "layout": "NCHW", "size": [32, 32], "scale": 1 / 255, "mean": MEAN, "std": STD}
    return {"onnxprune.preprocess": json.dumps(preprocess), "onnxprune.labels": json.dumps(CLASSES)}


def onnx_max_diff(path: Path, model: nn.Module, x_uint8: torch.Tensor) -> float | None:
    """Largest |logit difference| between the written ONNX file (onnxruntime) and the torch model, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    inputs = to_input(x_uint8.cpu(), channels_last=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"input": inputs.numpy()})[0]
    got = predict(cpu_copy(model), x_uint8.cpu()).numpy()
    return float(np.abs(ref - got).max())


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"cpu: {cpu}, {threads} threads"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, help="epochs to run now (default: to the end of the cycle)")
    p.add_argument("--cycle", type=int, help="length in epochs of a new cosine cycle (default: 2x the last one); "
                   "with --time-budget, the most it may have")
    p.add_argument("--init", type=Path, help="ONNX model to start from (default: models/<model>.onnx)")
    p.add_argument("--from-scratch", action="store_true", help="random init, a fresh schedule record")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxprune")
    p.add_argument("--train-npz", type=Path, help="training images (x uint8 NHWC, y) instead of --data")
    p.add_argument("--test-npz", type=Path, help="test images instead of --data")
    p.add_argument("--limit-train", type=int, help="train on the first N images only (smoke runs)")
    p.add_argument("--limit-test", type=int, help="evaluate on the first N test images only")
    p.add_argument("--out", type=Path, default=ROOT / "models", help="folder of the written <model>.onnx")
    p.add_argument("--log-dir", type=Path, help="folder of <model>.log (default: <out>/logs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, help="default 128 on cpu, 512 on cuda")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="default: adamw for the ViT, sgd for the CNNs")
    p.add_argument("--lr", type=float, help="peak lr of a new cycle (default 0.1 x sqrt(batch / 128) with sgd, "
                   "1e-3 x sqrt(batch / 128) with adamw)")
    p.add_argument("--warmup", type=float, help="warm-up epochs of a new cycle (default 1 at batch 128, else 2)")
    p.add_argument("--wd", type=float, help="weight decay (default 5e-4 with sgd, 0.05 with adamw)")
    p.add_argument("--cutout", type=int, default=0,
                   help="side in pixels of the Cutout square blanked in each training image (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast; auto: on CUDA, and on CPUs with AVX512-BF16/AMX")
    p.add_argument("--compile", choices=["auto", "off", "graphs", "default", "reduce-overhead",
                                        "max-autotune-no-cudagraphs"], default="auto",
                   help="graphs: CUDA graphs of forward + backward; others: torch.compile modes; "
                        "auto: graphs on cuda, off on cpu")
    p.add_argument("--swa-lr", type=float, help="stochastic weight averaging in a new cycle: the lr goes down to "
                   "this value by --swa-start, stays there, and the weights are averaged once an epoch from then on; "
                   "the averaged model (BN statistics re-estimated) is the one written at the end")
    p.add_argument("--swa-start", type=float, default=0.5, help="fraction of the cycle at which averaging starts")
    p.add_argument("--bn-images", type=int, default=10000,
                   help="training images (spread over the split, shuffled, augmented as in training) that "
                   "re-estimate BN statistics after averaging")
    p.add_argument("--time-budget", type=float, help="seconds for this whole run; a new cycle is fitted to it")
    p.add_argument("--reserve", type=float, default=30.0, help="seconds kept for the final evaluation and export")
    p.add_argument("--calib-images", type=int, default=2048,
                   help="training images (spread over the split, augmented as in training) that recalibrate BN "
                   "at load")
    p.add_argument("--eval-every", type=int, default=4, help="test accuracy every N epochs (0: at the end only)")
    p.add_argument("--export-every", type=int, help="write the ONNX every N epochs (default: 1 on cpu, 0 = end only)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding the JPEG tarballs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, export and return the written record (the ``onnxprune.training`` metadata)."""
    import onnx

    started = time.time()
    args = parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (512 if device.type == "cuda" else 128)
    optimizer = args.optimizer or OPTIMIZERS.get(args.model, "sgd")
    wd = args.wd if args.wd is not None else (0.05 if optimizer == "adamw" else 5e-4)
    lr = args.lr or (1e-3 if optimizer == "adamw" else 0.1) * math.sqrt(batch / 128)
    warmup = args.warmup if args.warmup is not None else (1.0 if batch <= 128 else 2.0)
    compile_mode = args.compile if args.compile != "auto" else ("graphs" if device.type == "cuda" else "off")
    if compile_mode == "graphs" and device.type != "cuda":
        compile_mode = "off"
    export_every = args.export_every if args.export_every is not None else (1 if device.type == "cpu" else 0)
    bf16 = use_bf16(args.bf16, device)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def split(npz: Path | None, name: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        return head(*(load_npz(npz) if npz else load_split(args.data, name, args.cache, args.workers)), limit)

    x_train, y_train = split(args.train_npz, "train", args.limit_train)
    x_test, y_test = split(args.test_npz, "test", args.limit_test)

    model = MODELS[args.model]()
    metadata = default_metadata()
    init = args.init or ROOT / "models" / f"{args.model}.onnx"
    bn_split = None  # how each loaded conv + BN pair was split: by the norms the file recorded, or unit variance
    if not args.from_scratch and not init.exists():
        sys.exit(f"{init} does not exist: train it --from-scratch first, or name the model to start from with --init")
    if args.from_scratch:
        record = fresh_record(args.model, args.seed)
    else:
        proto = onnx.load(str(init))
        record = read_record(proto, args.model)
        metadata.update({e.key: e.value for e in proto.metadata_props if e.key not in (TRAINING_KEY, NORMS_KEY)})
        if has_batchnorm(model):
            load_onnx_weights(model, proto)
            norms = read_weight_norms(proto, model)
            bn_split = "recorded norms" if norms else "unit variance"
            recalibrate(model, training_batches(torch.from_numpy(x_train), args.calib_images, 256, args.cutout,
                                                args.seed, channels_last=False), norms)
        else:
            load_plain_weights(model, proto)
    cycle, new_cycle = plan_cycle(record, args.cycle, lr, warmup, batch)
    if new_cycle and args.swa_lr is not None:
        if not 0.0 < args.swa_start < 1.0:
            sys.exit(f"--swa-start must lie between 0 and 1, not {args.swa_start}")
        cycle.update(swa_lr=args.swa_lr, swa_start=args.swa_start)
    fit_to_time = new_cycle and args.time_budget is not None and args.epochs is None
    if fit_to_time:
        cycle["length"] = args.cycle or 200
    epochs_now = min(math.inf if args.epochs is None else args.epochs, cycle["length"] - cycle["done"])

    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x_train_t, y_train_t = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)
    x_test_t, y_test_t = torch.from_numpy(x_test).to(device), torch.from_numpy(y_test).to(device)
    opt = make_optimizer(model, cycle["lr"], wd, optimizer)

    log_dir = args.log_dir or args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"{args.model}.log").open("a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    t_accel = time.time()
    try:
        sample = to_input(x_train_t[:batch], args.channels_last)
        forward = compiled(model, compile_mode, sample, bf16)
    except Exception as e:  # noqa: BLE001 - any failure to capture or compile: train eagerly
        say(f"{compile_mode} failed ({e!r}): eager")
        forward, compile_mode = eager(model), "off"
    if compile_mode == "graphs":
        say(f"CUDA graphs captured in {time.time() - t_accel:.1f} s")
    step = make_step(forward, opt, device, bf16)

    first_epoch = record["epochs"]
    entry = {"cycle": cycle["index"], "from": first_epoch, "to": first_epoch, "lr": cycle["lr"], "batch": batch,
             "device": device_name(device, args.threads), "minutes": 0.0, "test_acc": None,
             "test_images": len(x_test), "train_images": len(x_train), "bf16": bf16, "compile": compile_mode,
             "cutout": args.cutout, "bn_split": bn_split, "date": datetime.date.today().isoformat()}
    average: dict[str, torch.Tensor] | None = None  # running sum of the weights while the cycle averages (SWA)
    averaged = 0
    say(f"{args.model} from {'scratch' if args.from_scratch else init}: {record['epochs']} epochs so far; "
        f"cycle {cycle['index']} ({'new' if new_cycle else 'continued'}) at {cycle['done']}/{cycle['length']} "
        f"epochs, lr {cycle['lr']:.4g}, warm-up {cycle['warmup']}; running {epochs_now} epochs; batch {batch}, "
        f"device {entry['device']}, bf16 {bf16}, compile {compile_mode}, channels_last {args.channels_last}, "
        f"cutout {args.cutout}, {len(x_train)} training images" + (f", BN split by {bn_split}" if bn_split else "")
        + (f"; SWA at lr {cycle['swa_lr']:.4g} from {cycle['swa_start']:.0%} of the cycle" if "swa_lr" in cycle else ""))

    def write(acc: float | None, net: nn.Module) -> dict:
        minutes = round((time.time() - started) / 60, 2)
        entry.update(to=record["epochs"], minutes=minutes, test_acc=acc, compile=compile_mode)
        out = dict(record, cycle=dict(cycle), history=record["history"] + [dict(entry)],
                   optimizer=optimizer_note(wd, optimizer), seed=args.seed)
        norms = {NORMS_KEY: json.dumps(weight_norms(net), separators=(",", ":"))} if has_batchnorm(net) else {}
        export(net, args.out / f"{args.model}.onnx", {**metadata, TRAINING_KEY: json.dumps(out), **norms})
        return out

    steps_per_epoch = max(1, len(x_train) // batch)
    gen = torch.Generator(device=device)
    deadline = started + args.time_budget if args.time_budget else math.inf
    epoch_seconds: list[float] = []
    # fitted after the warm-up (torch.compile's first epoch includes the compilation), then refitted: see refit
    fit_after = max(1 if compile_mode in ("off", "graphs") else 2, math.ceil(cycle["warmup"]))
    fitted: tuple[float, int] | None = None  # (when, at which epoch of the cycle) it was fitted to the time budget
    acc = None
    done_now = 0
    try:
        while done_now < epochs_now:
            if epoch_seconds and time.time() + epoch_seconds[-1] > deadline - args.reserve:
                say(f"time budget: stopping before epoch {record['epochs'] + 1}")
                break
            t0 = time.time()
            gen.manual_seed(args.seed * 1_000_003 + record["epochs"])  # the data order depends on the epoch only
            perm = torch.randperm(len(x_train_t), generator=gen, device=device)
            loss_sum = torch.zeros((), device=device)
            for b in range(steps_per_epoch):
                idx = perm[b * batch : (b + 1) * batch]
                inputs = to_input(augment(x_train_t[idx], gen), args.channels_last)
                if args.cutout:
                    inputs = cutout(inputs, args.cutout, gen)
                position = cycle["done"] + (b + 1) / steps_per_epoch
                if fitted:  # anneal by time too, so that the cycle ends by the deadline even if epochs slow down
                    by_clock = time_position(fitted, cycle["length"], time.time(), deadline - args.reserve)
                    position = max(position, by_clock)
                try:
                    loss_sum += step(inputs, y_train_t[idx], lr_at(cycle, position))
                except Exception as e:  # noqa: BLE001 - torch.compile fails at the first step, not before
                    if compile_mode == "off" or done_now or b:
                        raise
                    say(f"{compile_mode} failed at the first step ({e!r}): eager")
                    forward, compile_mode = eager(model), "off"
                    step = make_step(forward, opt, device, bf16)
                    loss_sum += step(inputs, y_train_t[idx], lr_at(cycle, position))
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds.append(time.time() - t0)
            cycle["done"] += 1
            record["epochs"] += 1
            done_now += 1
            msg = (f"epoch {record['epochs']} (cycle {cycle['index']}: {cycle['done']}/{cycle['length']}) "
                   f"loss {float(loss_sum) / steps_per_epoch:.4f} lr {lr_at(cycle, position):.4g} "
                   f"{steps_per_epoch * batch / epoch_seconds[-1]:.0f} img/s "
                   f"time {(time.time() - started) / 60:.1f} min")
            if "swa_lr" in cycle and position >= averaging_start(cycle) - 1e-9:
                average, averaged = add_to_average(average, model), averaged + 1
                msg += f" averaged {averaged}"
            if args.eval_every and done_now % args.eval_every == 0:
                acc = accuracy(model, x_test_t, y_test_t, args.channels_last)
                msg += f" test acc {acc:.4f}"
            say(msg)
            left = deadline - args.reserve - time.time()
            length = refit(cycle, epoch_seconds, fit_after, left, args.cycle or 200, fitted is not None,
                           averaged > 0) if fit_to_time else None
            if length:
                cycle["length"], fitted = length, (time.time(), cycle["done"])
                epochs_now = cycle["length"] - cycle["done"] + done_now
                say(f"cycle fitted to the time budget: {length} epochs at {min(epoch_seconds[fit_after - 1:]):.1f} "
                    "s each")
            if export_every and done_now % export_every == 0 and done_now < epochs_now:
                write(acc, model)
    except KeyboardInterrupt:
        say("interrupted: exporting what there is")
    if fit_to_time:  # annealed by the clock, the lr reached 0 by the deadline: the cycle is complete
        if not fitted:
            say("time budget: stopped before the cycle could be fitted; recorded as complete, lr not annealed")
        cycle["length"] = cycle["done"]
    acc = accuracy(model, x_test_t, y_test_t, args.channels_last)
    if average is not None:
        say(f"torch test accuracy {acc:.4f} before averaging; averaging {averaged} epochs' weights")
        batches = training_batches(x_train_t, args.bn_images, batch, args.cutout, args.seed, args.channels_last)
        model = averaged_model(model, average, averaged, batches)
        entry.update(averaged_epochs=averaged, test_acc_before_averaging=acc)
        acc = accuracy(model, x_test_t, y_test_t, args.channels_last)
    out = write(acc, model)
    path = args.out / f"{args.model}.onnx"
    diff = onnx_max_diff(path, model, x_test_t[:64])
    say(f"done: epochs {record['epochs']}, cycle {cycle['index']} at {cycle['done']}/{cycle['length']}, "
        f"{(time.time() - started) / 60:.1f} min, torch test accuracy {acc:.4f} on {len(x_test)} images, "
        f"wrote {path}"
        + (f" (onnxruntime max |diff| {diff:.2e})" if diff is not None else ""))
    log.close()
    return out


if __name__ == "__main__":
    main()
