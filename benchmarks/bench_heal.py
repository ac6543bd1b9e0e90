"""Healing after pruning (issue "Healing"): test accuracy of the reference models unpruned, pruned, and healed.

    python benchmarks/bench_heal.py [--models resnet56,mobilenetv2] [--methods layermerge,slp]
                                    [--speedups 1.5,2.0] [--steps 1000] [--full-epochs 0] [--repair]
                                    [--match-blocks] [--ema D] [--lr LR] [--batch B] [--no-mixup]
                                    [--seed S] [--keep DIR] [--json OUT.json]

For each model, method and target speed-up: ``api.prune`` to the measured speed-up on ort-cpu (latency batch 32,
scoring on the 512 shipped calibration images), then ``api.heal`` without labels on those 512 images (10% of them
held back to pick the checkpoint; ``--steps`` steps of 64, crop + flip; ``--steps 0``: not), and with
``--full-epochs E`` also on the 50,000 CIFAR-10 training images without labels for E epochs (2% held back).
Every model is evaluated on all 10,000 test images (``onnxprune eval``'s code path); wall time of each stage. The CIFAR-10 tarballs are decoded once into
``~/.cache/onnxprune`` (models/train.py's cache). ``--repair``: prune with ``repair=RepairOptions()`` (a fitted
linear map in every cut, the DP's map options included; docs/algorithms.md section 8), so healing starts from the
repaired model; the "pruned" column is then the repaired model's accuracy. ``--match-blocks``: heal with
``HealingOptions(match_blocks=True)`` (every residual block output the pruned model keeps is matched too);
``--ema D``: ``HealingOptions(ema=D)`` (a moving average of the weights is evaluated and kept); ``--lr LR``:
``HealingOptions(lr=LR)`` (AdamW's peak learning rate); ``--batch B``: ``HealingOptions(batch=B)`` (samples per
step; with ``--full-epochs`` the steps grow as the batch shrinks); ``--no-mixup``: ``HealingOptions(mixup=False)``
(crop + flip only); ``--seed S``: ``HealingOptions(seed=S)`` (data order, augmentation, held-back split). Each of these tags the healed model's file name.
``--keep DIR``: the pruned and healed models are kept in DIR, and a pruned model found there (with the
``.prune.json`` its run wrote) is reused instead of pruned again, so that healing recipes compare on one plan.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.train import load_split  # noqa: E402
from onnxprune import api  # noqa: E402
from onnxprune.options import (DataOptions, HealingOptions, LatencyOptions, OutputOptions, RepairOptions,  # noqa: E402
                               TargetOptions)

DATA = ROOT.parent / "shared" / "data" / "cifar10"
CACHE = Path.home() / ".cache" / "onnxprune"


def split_file(split: str) -> str:
    """The CIFAR-10 split as an .npz (x uint8 NHWC, y) that --data reads."""
    path = CACHE / f"cifar10_{split}.npz"
    if not path.exists():
        load_split(DATA, split, CACHE)
    return str(path)


def accuracy(model: str, test: str) -> float:
    return api.evaluate(model, DataOptions(test, batch=250)).to_dict()["accuracy"]


def prune(name: str, method: str, speedup: float, repair: bool, folder: Path) -> tuple[Path, dict]:
    """The pruned model's path and its prune figures; reused from ``folder`` when an earlier run left them."""
    pruned = folder / f"{name}_{method}_{speedup}{'_repaired' if repair else ''}.onnx"
    record = pruned.with_suffix(".prune.json")
    if pruned.exists() and record.exists():
        return pruned, {**json.loads(record.read_text()), "reused": str(pruned)}
    t = time.perf_counter()
    result = api.prune(str(ROOT / "models" / f"{name}.onnx"), TargetOptions(method=method, speedup=speedup),
                       OutputOptions(str(pruned)), DataOptions(str(ROOT / "models" / "cifar10_calib512.npz")),
                       latency=LatencyOptions(batch=32), repair=RepairOptions() if repair else None).to_dict()
    figures = dict(prune_s=time.perf_counter() - t, measured=result["measured_speedup"], met=result["target_met"],
                   removed=len(result["removed_blocks"]), merged=len(result.get("merged", [])))
    record.write_text(json.dumps(figures) + "\n")
    return pruned, figures


def recipe_tag(recipe: dict) -> str:
    """The healed model's file-name suffix for a recipe (the HealingOptions fields set on the command line)."""
    names = {"match_blocks": lambda v: "_blocks", "ema": lambda v: f"_ema{v}", "lr": lambda v: f"_lr{v:g}",
             "batch": lambda v: f"_b{v}", "mixup": lambda v: "" if v else "_nomixup",
             "seed": lambda v: f"_seed{v}"}
    return "".join(names[key](value) for key, value in recipe.items() if value is not None)


def run(name: str, method: str, speedup: float, steps: int, full_epochs: float, folder: Path, test: str,
        repair: bool = False, recipe: dict | None = None) -> dict:
    """One row: prune (or reuse), then heal with ``recipe`` (HealingOptions overrides) on 512 and 50,000 images."""
    recipe = {key: value for key, value in (recipe or {}).items() if value is not None}
    original = str(ROOT / "models" / f"{name}.onnx")
    calib = str(ROOT / "models" / "cifar10_calib512.npz")
    row: dict = {"model": name, "method": method, "target": speedup, "repair": repair, **recipe}
    pruned, figures = prune(name, method, speedup, repair, folder)
    row.update(figures)
    row["original"] = accuracy(original, test)
    row["pruned"] = accuracy(str(pruned), test)
    tag = recipe_tag(recipe)
    if steps:
        healed = folder / f"{pruned.stem}_healed512{tag}.onnx"
        t = time.perf_counter()
        h = api.heal(str(pruned), original, OutputOptions(str(healed)), DataOptions(calib),
                     HealingOptions(steps=steps, use_labels=False, **recipe)).to_dict()
        row.update(heal512_s=time.perf_counter() - t, heal512=accuracy(str(healed), test),
                   heal512_held_back=[h["after_pruning"]["agreement"], h["after_healing"]["agreement"]],
                   heal512_best_step=h["healing"]["best_step"])
    if full_epochs:
        healed = folder / f"{pruned.stem}_healed50k{tag}.onnx"
        t = time.perf_counter()
        h = api.heal(str(pruned), original, OutputOptions(str(healed)), DataOptions(split_file("train")),
                     HealingOptions(epochs=full_epochs, use_labels=False, holdout=0.02, **recipe)).to_dict()
        row.update(heal50k_s=time.perf_counter() - t, heal50k=accuracy(str(healed), test),
                   heal50k_epochs=h["healing"]["epochs"], heal50k_best_step=h["healing"]["best_step"])
    print(json.dumps(row), flush=True)
    return row


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet56,mobilenetv2")
    p.add_argument("--methods", default="layermerge,slp")
    p.add_argument("--speedups", default="1.5,2.0")
    p.add_argument("--steps", type=int, default=1000, help="healing steps on the 512 images (0: none)")
    p.add_argument("--full-epochs", type=float, default=0)
    p.add_argument("--repair", action="store_true", help="prune with fitted linear maps in the cuts, then heal")
    p.add_argument("--match-blocks", action="store_const", const=True, default=None,
                   help="heal with every kept residual block output matched")
    p.add_argument("--no-mixup", dest="mixup", action="store_const", const=False, default=None,
                   help="heal on the augmented images without blending them (mixup is on by default)")
    p.add_argument("--ema", type=float, default=None, help="heal keeping a moving average of the weights (decay)")
    p.add_argument("--lr", type=float, default=None, help="heal with this peak learning rate (default: HealingOptions')")
    p.add_argument("--batch", type=int, default=None, help="heal with this many samples a step (default: HealingOptions')")
    p.add_argument("--seed", type=int, default=None, help="heal with this seed (default: HealingOptions')")
    p.add_argument("--keep", default=None, help="keep the models in this folder, and reuse pruned models found there")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    test = split_file("test")
    recipe = dict(match_blocks=args.match_blocks, ema=args.ema, lr=args.lr, batch=args.batch, mixup=args.mixup,
                  seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            for method in args.methods.split(","):
                for speedup in map(float, args.speedups.split(",")):
                    try:
                        rows.append(run(name, method, speedup, args.steps, args.full_epochs, folder, test,
                                        args.repair, recipe))
                    except Exception as exc:  # a refusal is a result too
                        rows.append({"model": name, "method": method, "target": speedup, "error": str(exc)})
                        print(json.dumps(rows[-1]), flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("| model | method | target | measured | removed / merged | original | pruned | healed, 512 imgs | "
          "prune s | heal s | healed, 50k imgs | heal s |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | {r['target']} | failed: {r['error'][:80]} |")
            continue
        print(f"| {r['model']} | {r['method']} | {r['target']}x | {r['measured']:.2f}x | {r['removed']} / {r['merged']} | "
              f"{100 * r['original']:.2f}% | {100 * r['pruned']:.2f}% | {percent(r.get('heal512'))} | "
              f"{r['prune_s']:.0f} | {seconds(r.get('heal512_s'))} | {percent(r.get('heal50k'))} | "
              f"{seconds(r.get('heal50k_s'))} |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
