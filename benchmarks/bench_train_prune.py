"""Concurrent training and layer pruning (docs/algorithms.md section 5) against prune-then-heal, at the same
measured speed-up.

    python benchmarks/bench_train_prune.py [--model resnet56] [--steps 2000] [--speedup X] [--block-cost C]
                                           [--heal-steps 2000] [--train-samples N] [--test-samples N] [--json OUT]

1. ``api.train_prune`` on the trained model from the CIFAR-10 training split (50,000 images, labels: cross-entropy;
   ``--teacher``: plus KL to the original's logits), ``--steps`` steps of 64 (``--speedup`` stops pruning at a
   measured speed-up on ort-cpu, latency batch 32; ``--from-scratch``: from re-initialised weights, and step 2 is
   left out);
   blocks pruned, test accuracy, training time, measured speed-up against the normalized original.
2. At the speed-up train-prune measured: SLP + healing and LayerMerge + healing (``api.prune`` with
   ``heal_data`` = the same training images, ``--heal-steps`` steps; healing's loss: feature MSE and KL to the
   original, plus cross-entropy on the labels), test accuracy and time of each.
``--baselines-at X [--methods layermerge]``: step 2 alone, at X (a train-prune speed-up measured before);
``--methods ''``: step 1 alone.
Every model is evaluated on the 10,000 test images (``--test-samples`` for a subset). The CIFAR-10 tarballs are
decoded once into ``~/.cache/onnxprune`` (benchmarks/bench_heal.py's split_file). A smoke run:
``--model resnet20 --train-data models/cifar10_calib512.npz --steps 4 --heal-steps 2 --test-samples 256
--block-cost 5 --theta-lr 0.5``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_heal import split_file  # noqa: E402
from onnxprune import api  # noqa: E402
from onnxprune.options import (DataOptions, GateTrainingOptions, HealingOptions, LatencyOptions,  # noqa: E402
                               OutputOptions, TargetOptions)

LATENCY = LatencyOptions(batch=32)


def accuracy(model: str, test: DataOptions) -> float:
    return api.evaluate(model, test).to_dict()["accuracy"]


def train_prune_row(args: argparse.Namespace, original: str, train: DataOptions, test: DataOptions, tmp: Path,
                    rows: list) -> float:
    """Step 1: train-prune, its row appended to ``rows``; the speed-up the baselines prune to."""
    out = tmp / "train_prune.onnx"
    t = time.perf_counter()
    result = api.train_prune(original, OutputOptions(str(out)), train,
                             GateTrainingOptions(steps=args.steps, block_cost=args.block_cost,
                                                 theta_lr=args.theta_lr, speedup=args.speedup, holdout=0.02,
                                                 from_scratch=args.from_scratch,
                                                 patience=min(20, max(1, args.steps // 4))),
                             teacher_path=original if args.teacher else None, latency=LATENCY).to_dict()
    seconds = time.perf_counter() - t
    thetas = json.loads(Path(result["thetas"]).read_text())
    measured = api.bench(original, str(out), LATENCY).to_dict()["speedup"]
    rows.append({"method": "train-prune", "removed": len(result["removed_blocks"]), "speedup": measured,
                 "accuracy": accuracy(str(out), test), "seconds": seconds,
                 "original": accuracy(original, test), "pruned_at": result["pruned_at"],
                 "final_theta": dict(zip(thetas["blocks"], (thetas["evaluations"] or [{"theta": []}])[-1]["theta"]))})
    print(json.dumps(rows[-1]), flush=True)
    return max(measured, 1.01)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--speedup", type=float, default=None)
    p.add_argument("--block-cost", type=float, default=GateTrainingOptions.block_cost)
    p.add_argument("--theta-lr", type=float, default=GateTrainingOptions.theta_lr)
    p.add_argument("--heal-steps", type=int, default=2000)
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--train-data", default=None, help="default: the 50,000-image CIFAR-10 training split")
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--teacher", action="store_true", help="train-prune distils from the original beside the labels "
                   "(cross-entropy + KL, the loss the prune-then-heal rows' healing uses)")
    p.add_argument("--from-scratch", action="store_true", help="train-prune from re-initialised weights; the "
                   "prune-then-heal rows, which start from the trained model, are left out")
    p.add_argument("--baselines-at", type=float, default=None, help="skip train-prune: the prune-then-heal rows "
                   "alone, at this speed-up (one train-prune measured before)")
    p.add_argument("--methods", default="slp,layermerge", help="the prune-then-heal rows")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    original = str(ROOT / "models" / f"{args.model}.onnx")
    train = DataOptions(args.train_data or split_file("train"), samples=args.train_samples)
    test = DataOptions(split_file("test"), samples=args.test_samples, batch=250)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-prune-") as tmp:
        if args.baselines_at is None:
            target = train_prune_row(args, original, train, test, Path(tmp), rows)
        else:
            target = args.baselines_at
        for method in () if args.from_scratch else [m for m in args.methods.split(",") if m]:
            path = Path(tmp) / f"{method}.onnx"
            t = time.perf_counter()
            try:
                r = api.prune(original, TargetOptions(method=method, speedup=target), OutputOptions(str(path)),
                              DataOptions(str(ROOT / "models" / "cifar10_calib512.npz")), latency=LATENCY,
                              healing=HealingOptions(steps=args.heal_steps, holdout=0.02), heal_data=train).to_dict()
                rows.append({"method": f"{method} + healing", "removed": len(r["removed_blocks"]),
                             "speedup": r["measured_speedup"], "accuracy": accuracy(str(path), test),
                             "seconds": time.perf_counter() - t})
            except Exception as exc:  # a refusal is a result too
                rows.append({"method": f"{method} + healing", "error": str(exc)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("| method | blocks removed | measured speed-up | test accuracy | time s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['method']} | {r['removed']} | {r['speedup']:.2f}x | {100 * r['accuracy']:.2f}% | "
                  f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
