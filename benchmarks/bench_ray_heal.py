"""Healing on Ray Train against one process (issue 18; docs/scale-out.md, "Healing across machines").

    python benchmarks/bench_ray_heal.py [--model models/resnet20.onnx] [--remove 2] [--steps 60] [--batch 64]

The shipped model with its first ``--remove`` removable blocks removed is healed on the shipped calibration images
(label-free, augmentation and mixup on) for ``--steps`` steps: by ``onnxprune.train.heal.heal`` in this process
(torch's default threads), then by ``heal_on_ray`` with 1 and 2 workers on a local Ray of 2 CPUs (each worker one
CPU, one torch thread, DDP over gloo). Printed: a markdown table of the median step, the training's wall time
(for Ray: the trainer's ``fit``, worker start-up included) and the largest weight difference from the one-process
run, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "resnet20.onnx"))
    p.add_argument("--data", default=str(ROOT / "models" / "cifar10_calib512.npz"))
    p.add_argument("--remove", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()

    import ray

    from onnxprune.data.sources import load_data
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.graph.io import load_model
    from onnxprune.options import HealingOptions, RayOptions
    from onnxprune.plan import Plan, apply_plan
    from onnxprune.scaleout import cluster
    from onnxprune.scaleout.heal import heal_on_ray
    from onnxprune.train.heal import heal

    teacher = load_model(args.model)
    joins = [b.join for b in analyze_model(teacher).residual_blocks if b.removable][:args.remove]
    student, _ = apply_plan(teacher, Plan(remove_blocks=joins))
    data = load_data(args.data, teacher)
    options = HealingOptions(steps=args.steps, batch=args.batch, evaluations=2, use_labels=False)

    rows = []
    clock = time.perf_counter()
    plain = heal(student, teacher, data, options, "cpu")
    rows.append(("one process (torch's default threads)", plain.record["seconds_per_step"],
                 time.perf_counter() - clock, plain.model, plain.record["held_back_agreement_after"]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        for workers in (1, 2):
            with cluster.connect(RayOptions("auto", workers=workers)):
                result = heal_on_ray(student, teacher, data, options, RayOptions("auto", workers=workers), "cpu")
            rows.append((f"Ray Train, {workers} worker(s), 1 CPU each", result.record["seconds_per_step"],
                         result.record["fit_seconds"], result.model, result.record["held_back_agreement_after"]))
    finally:
        ray.shutdown()

    reference = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    print(f"\n{Path(args.model).name}, {len(joins)} blocks removed, {args.steps} steps of {args.batch}, commit "
          f"{commit.strip()}\n")
    print("| run | median step (s) | training wall time (s) | max weight difference from one process | "
          "held-back agreement after |")
    print("| --- | --- | --- | --- | --- |")
    for name, step_s, wall_s, model, agreement in rows:
        diff = max(float(np.abs(numpy_helper.to_array(t) - reference[t.name]).max()) for t in model.graph.initializer)
        print(f"| {name} | {step_s:.3f} | {wall_s:.1f} | {diff:.2g} | {100 * agreement:.1f}% |")


if __name__ == "__main__":
    main()
