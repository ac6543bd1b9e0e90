"""Train a reference model on CIFAR-10 on the CPU and export it to ONNX (opset 17, dynamic batch).

Usage (from the repository root):
    python models/train.py resnet56 --epochs 24 --data ../shared/data/cifar10

The CIFAR-10 JPEG tarballs are decoded once into a uint8 cache (``--cache``). Training is plain
SGD with Nesterov momentum, a linear warm-up then a cosine schedule, random crop (4-pixel zero
padding) and horizontal flip, chosen so that each model trains in about 90 minutes on 2 cores.
A checkpoint is written to the cache after every epoch; running the same command again resumes
from it (wall times then include only the epochs actually run). The exported ONNX file carries its preprocessing (``onnxprune.preprocess``) and class names
(``onnxprune.labels``) in ``metadata_props``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.definitions import MODELS  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


def decode_split(tar_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``<split>/<class>/NNNN.jpg`` members into (N, 32, 32, 3) uint8 images and int64 labels."""
    from PIL import Image

    images, labels = [], []
    with tarfile.open(tar_path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-2] not in CLASSES:
                continue
            data = tar.extractfile(member).read()
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8))
            labels.append(CLASSES.index(parts[-2]))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_split(data_dir: Path, split: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    cache = cache_dir / f"cifar10_{split}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return f["x"], f["y"]
    x, y = decode_split(data_dir / f"{split}.tar.gz")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=y)
    return x, y


def to_input(x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    x = x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip (NHWC uint8)."""
    n = batch.shape[0]
    padded = F.pad(batch, (0, 0, 4, 4, 4, 4))
    offsets = torch.randint(0, 9, (n, 2), generator=gen)
    out = torch.stack([padded[i, a : a + 32, b : b + 32] for i, (a, b) in enumerate(offsets.tolist())])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(2)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(to_input(torch.from_numpy(x[i : i + batch])))
        correct += int((logits.argmax(1).numpy() == y[i : i + batch]).sum())
    return correct / len(x)


def export(model: torch.nn.Module, path: Path, opset: int = 17) -> None:
    import onnx

    model.eval().to(memory_format=torch.contiguous_format)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model, (torch.randn(1, 3, 32, 32),), str(tmp), dynamo=False, opset_version=opset,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(tmp))
    preprocess = {"input": "input", "layout": "NCHW", "size": [32, 32], "scale": 1 / 255, "mean": MEAN, "std": STD}
    for key, value in (("onnxprune.preprocess", json.dumps(preprocess)), ("onnxprune.labels", json.dumps(CLASSES))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    tmp.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--data", type=Path, default=Path("../shared/data/cifar10"))
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxprune")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_split(args.data, "train", args.cache)
    x_test, y_test = load_split(args.data, "test", args.cache)
    x_train_t, y_train_t = torch.from_numpy(x_train), torch.from_numpy(y_train)

    model = MODELS[args.model]().to(memory_format=torch.channels_last)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim > 1]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = len(x_train) // args.batch
    total, warm = args.epochs * steps_per_epoch, int(args.warmup * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    log_path = args.out / "logs" / f"{args.model}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = args.cache / f"{args.model}_seed{args.seed}_e{args.epochs}.pt"
    first_epoch, step, elapsed = 0, 0, 0.0
    if checkpoint.exists():  # resume: the schedule depends only on the step, so it continues exactly
        state = torch.load(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        first_epoch, step, elapsed = state["epoch"], state["step"], state["elapsed"]
    log = log_path.open("a" if first_epoch else "w")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    if first_epoch:
        say(f"resumed from {checkpoint} after epoch {first_epoch}")
    else:
        say(f"{args.model}: {sum(p_.numel() for p_ in model.parameters())} params, {vars(args)}")
    start = time.time() - elapsed
    for epoch in range(first_epoch, args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch : (b + 1) * args.batch]
            inputs = to_input(augment(x_train_t[idx], gen))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(inputs), y_train_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
        msg = f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / steps_per_epoch:.4f} time {(time.time() - start) / 60:.1f} min"
        if (epoch + 1) % 4 == 0 or epoch + 1 == args.epochs:
            msg += f" test acc {evaluate(model, x_test, y_test):.4f}"
        say(msg)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "epoch": epoch + 1,
                    "step": step, "elapsed": time.time() - start}, checkpoint)
    train_minutes = (time.time() - start) / 60
    acc = evaluate(model, x_test, y_test)
    onnx_path = args.out / f"{args.model}.onnx"
    export(model, onnx_path)
    say(f"done: {args.epochs} epochs, {train_minutes:.1f} min, torch test accuracy {acc:.4f}, wrote {onnx_path}")


if __name__ == "__main__":
    main()
