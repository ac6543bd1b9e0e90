"""Training-free repair (issue "Training-free repair"): test accuracy of the reference models pruned, pruned +
repair (fitted sequentially and independently), and pruned + repair + healing.

    python benchmarks/bench_repair.py [--models resnet56,mobilenetv2] [--methods layermerge,slp]
                                      [--speedups 1.5,2.0] [--heal-steps 0] [--json OUT.json]
    python benchmarks/bench_repair.py --models vit --methods slp --fractions 0.25,0.5   # a share of the blocks

For each model, method and target speed-up: ``api.prune`` with ``--repair linear`` to the measured speed-up on
ort-cpu (latency batch 32; scoring and the fit on the 512 shipped calibration images; candidates timed with
placeholder maps, so the target holds with the maps in place). The same plan applied without repair gives the
pruned model; ``repair`` with independent fitting gives the comparison. With ``--heal-steps N`` the sequentially
repaired model is also healed without labels on the 512 images (``api.heal``). Every model is evaluated on all
10,000 CIFAR-10 test images; the speed-up of the pruned model without maps is measured side by side with the
repaired one (ort-cpu, batch 32, 25 rounds). With ``--fractions``, SLP removes that share of the removable
blocks (``--remove-blocks``, rounded) instead of pruning to a speed-up, and the speed-up is measured after.
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

from benchmarks.bench_heal import accuracy, split_file  # noqa: E402
from onnxprune import api  # noqa: E402
from onnxprune.data.sources import load_data  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model, save_model  # noqa: E402
from onnxprune.options import (DataOptions, HealingOptions, LatencyOptions, OutputOptions, RepairOptions,  # noqa: E402
                               TargetOptions)
from onnxprune.plan import apply_plan, load_plan  # noqa: E402
from onnxprune.repair.linear import repair  # noqa: E402


def target_options(original: str, method: str, target: float, fraction: bool) -> TargetOptions:
    """To a speed-up, or (``fraction``) SLP removing that share of the removable blocks."""
    if not fraction:
        return TargetOptions(method=method, speedup=target)
    removable = sum(b.removable for b in analyze_model(load_model(original)).residual_blocks)
    return TargetOptions(method=method, remove_blocks=round(target * removable))


def run(name: str, method: str, speedup: float, heal_steps: int, folder: Path, test: str,
        fraction: bool = False) -> dict:
    original = str(ROOT / "models" / f"{name}.onnx")
    calib = str(ROOT / "models" / "cifar10_calib512.npz")
    row: dict = {"model": name, "method": method, "target": speedup, "fraction": fraction}
    repaired = folder / f"{name}_{method}_{speedup}_repaired.onnx"
    t = time.perf_counter()
    target = target_options(original, method, speedup, fraction)
    result = api.prune(original, target, OutputOptions(str(repaired)), DataOptions(calib),
                       latency=LatencyOptions() if fraction else LatencyOptions(batch=32),
                       repair=RepairOptions()).to_dict()
    row["prune_s"] = time.perf_counter() - t
    if fraction:  # nothing timed in the run: the repaired model against the original, side by side
        result["measured_speedup"] = api.bench(original, str(repaired), LatencyOptions(batch=32)).to_dict()["speedup"]
    row.update(measured=result["measured_speedup"],
               measured_in_search=result.get("measured_speedup_in_search", result["measured_speedup"]),
               met=result.get("target_met", True),
               removed=len(result["removed_blocks"]), merged=len(result.get("merged", [])),
               maps=len(result["repair"]["maps"]), folded=sum(m["placed"].startswith("folded")
                                                             for m in result["repair"]["maps"]),
               fit_s=result["repair"]["seconds"])
    model = load_model(original)
    pruned_model, _ = apply_plan(model, load_plan(repaired.with_suffix(".plan.json")))
    pruned = folder / f"{name}_{method}_{speedup}.onnx"
    save_model(pruned_model, pruned)
    data = load_data(calib, model)
    independent = repair(pruned_model, model, data, RepairOptions(sequential=False))
    independent_path = folder / f"{name}_{method}_{speedup}_independent.onnx"
    save_model(independent.model, independent_path)
    row.update(independent_fit_s=independent.record["seconds"], original=accuracy(original, test),
               pruned=accuracy(str(pruned), test), repaired=accuracy(str(repaired), test),
               independent=accuracy(str(independent_path), test))
    if heal_steps:
        healed = folder / f"{name}_{method}_{speedup}_repaired_healed.onnx"
        t = time.perf_counter()
        api.heal(str(repaired), original, OutputOptions(str(healed)), DataOptions(calib),
                 HealingOptions(steps=heal_steps, use_labels=False))
        row.update(heal_s=time.perf_counter() - t, healed=accuracy(str(healed), test))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet56,mobilenetv2")
    p.add_argument("--methods", default="layermerge,slp")
    p.add_argument("--speedups", default="1.5,2.0")
    p.add_argument("--fractions", help="instead of --speedups: shares of the removable blocks SLP removes")
    p.add_argument("--heal-steps", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    test = split_file("test")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-repair-") as tmp:
        for name in args.models.split(","):
            for method in args.methods.split(","):
                for speedup in map(float, (args.fractions or args.speedups).split(",")):
                    try:
                        rows.append(run(name, method, speedup, args.heal_steps, Path(tmp), test,
                                        args.fractions is not None))
                    except Exception as exc:  # a refusal is a result too
                        rows.append({"model": name, "method": method, "target": speedup, "error": str(exc)})
                        print(json.dumps(rows[-1]), flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("| model | method | target | measured after repair (in the search) | removed / merged | maps (folded) | original | "
          "pruned | + repair, sequential | + repair, independent | + repair + healing | fit s (independent) | "
          "prune s |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | {r['target']} | failed: {r['error'][:80]} |")
            continue
        healed = f"{100 * r['healed']:.2f}%" if "healed" in r else "-"
        target = f"{r['target']:.0%} of the blocks" if r.get("fraction") else f"{r['target']}x"
        print(f"| {r['model']} | {r['method']} | {target} | {r['measured']:.3f}x ({r.get('measured_in_search', r.get('measured_without_maps')):.3f}x)"
              f"{'' if r['met'] else ' MISSED'} | {r['removed']} / {r['merged']} | {r['maps']} ({r['folded']}) | "
              f"{100 * r['original']:.2f}% | {100 * r['pruned']:.2f}% | {100 * r['repaired']:.2f}% | "
              f"{100 * r['independent']:.2f}% | {healed} | {r['fit_s']:.1f} ({r['independent_fit_s']:.1f}) | "
              f"{r['prune_s']:.0f} |")


if __name__ == "__main__":
    main()
