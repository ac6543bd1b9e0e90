"""SGLP against SLP, random and L1-norm block removal (issue 14; docs/algorithms.md section 3).

    python benchmarks/bench_sglp.py [--models resnet56,mobilenetv2] [--blocks 9,4] [--samples 512] [--seeds 5]
                                    [--rounds 25] [--heal-steps 200] [--test PATH.npz] [--json OUT.json]

For each model the same number of blocks (``--blocks``, one count per model) is removed by SGLP (segments at the elbow, GradNorm with
the calibration labels), SLP (iterative, re-scored after each removal), random orders (``--seeds`` seeds) and the
smallest L1 norm of the branch weights (onnxprune.importance.baselines), the last two keeping one block per stage
as SLP does; LayerMerge (``api.prune --method layermerge``) is run at SGLP's measured speed-up. The calibration data is the shipped 512 images (``--samples`` of them). Each pruned model is
evaluated without fine-tuning on the 10,000 CIFAR-10 test images (``--test`` for another file, e.g. the shipped
models/cifar10_test1000.npz for a quick run) and timed side by side with the original on ort-cpu at batch 32
(measured speed-up); the wall time of each method's choice is reported. Every pruned model is then healed with the
same budget (``api.heal``, label-free, ``--heal-steps`` steps of 64 on the same 512 images, 10% held back) and
evaluated again. For ResNet-56, SGLP's segments are printed
(which blocks fall in which segment, which were removed).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_heal import accuracy, split_file  # noqa: E402
from onnxprune.data.sources import load_data  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model, save_model  # noqa: E402
from onnxprune import api  # noqa: E402
from onnxprune.importance.baselines import l1_norms, random_order  # noqa: E402
from onnxprune.importance.sglp import prune_sglp  # noqa: E402
from onnxprune.importance.slp import prune_slp, removal_candidates, take_in_order  # noqa: E402
from onnxprune.latency.backends import get_backend  # noqa: E402
from onnxprune.latency.measure import compare  # noqa: E402
from onnxprune.options import DataOptions, HealingOptions, LatencyOptions, OutputOptions, TargetOptions  # noqa: E402
from onnxprune.plan import Plan, apply_plan  # noqa: E402
from onnxprune.runtime.capture import feature_tensor  # noqa: E402
from onnxprune.speedup import normalized  # noqa: E402


def evaluate(model, joins: list[str], folder: Path, tag: str, test: str, rounds: int) -> dict:
    pruned, _ = apply_plan(model, Plan(remove_blocks=joins))
    path = folder / f"{tag}.onnx"
    save_model(pruned, path)
    measured = compare([normalized(model), pruned], get_backend("ort-cpu"), 32, rounds)
    return {"path": str(path), "accuracy": accuracy(str(path), test), "speedup": measured.speedups[1]}


def healed_accuracy(pruned: str, original: str, steps: int, test: str) -> dict:
    """Accuracy after the same label-free healing budget for every method (``api.heal``)."""
    healed = pruned.replace(".onnx", "_healed.onnx")
    t = time.perf_counter()
    api.heal(pruned, original, OutputOptions(healed), DataOptions(str(ROOT / "models" / "cifar10_calib512.npz")),
             HealingOptions(steps=steps, use_labels=False))
    return {"healed": accuracy(healed, test), "heal_seconds": time.perf_counter() - t}


def run(name: str, blocks: int, samples: int, seeds: int, rounds: int, heal_steps: int, test: str,
        folder: Path) -> list[dict]:
    original_path = str(ROOT / "models" / f"{name}.onnx")
    model = load_model(original_path)
    data = load_data(str(ROOT / "models" / "cifar10_calib512.npz"), model, samples=samples)
    structure = analyze_model(model)
    candidates = removal_candidates(structure, 1)
    original = accuracy(str(ROOT / "models" / f"{name}.onnx"), test)
    rows = [{"model": name, "method": "original", "blocks": 0, "accuracy": original, "speedup": 1.0, "seconds": 0.0}]

    def add(method: str, joins: list[str], seconds: float, **extra) -> None:
        row = {"model": name, "method": method, "blocks": len(joins), "removed": joins, "seconds": seconds, **extra}
        row.update(evaluate(model, joins, folder, f"{name}_{method}", test, rounds))
        if heal_steps:
            row.update(healed_accuracy(row.pop("path"), original_path, heal_steps, test))
        rows.append(row)
        print(json.dumps(row), flush=True)

    t = time.perf_counter()
    result = prune_sglp(model, data, remove_blocks=blocks)
    predicted = result.plan.predicted
    segments = [{"blocks": s["blocks"], "removed": [j for j in s["blocks"] if j in result.plan.remove_blocks]}
                for s in predicted["segments"]]
    add("sglp", result.plan.remove_blocks, time.perf_counter() - t, segments=segments,
        segments_chosen_by=predicted["segments_chosen_by"])
    lm_path = folder / f"{name}_layermerge.onnx"
    t = time.perf_counter()
    lm = api.prune(original_path, TargetOptions(method="layermerge", speedup=round(rows[-1]["speedup"], 2)),
                   OutputOptions(str(lm_path)), DataOptions(str(ROOT / "models" / "cifar10_calib512.npz"),
                                                            samples=samples), latency=LatencyOptions(batch=32)).to_dict()
    lm_row = {"model": name, "method": "layermerge", "blocks": len(lm["removed_blocks"]),
              "merged": len(lm.get("merged", [])), "seconds": time.perf_counter() - t,
              "target": round(rows[-1]["speedup"], 2), "accuracy": accuracy(str(lm_path), test),
              "speedup": compare([normalized(model), load_model(lm_path)], get_backend("ort-cpu"), 32,
                                 rounds).speedups[1]}
    if heal_steps:
        lm_row.update(healed_accuracy(str(lm_path), original_path, heal_steps, test))
    rows.append(lm_row)
    print(json.dumps(lm_row), flush=True)
    t = time.perf_counter()
    slp = prune_slp(model, data, feature_tensor(model), TargetOptions(remove_blocks=blocks))
    add("slp", slp.plan.remove_blocks, time.perf_counter() - t)
    t = time.perf_counter()
    norms = l1_norms(model, candidates)
    add("l1", take_in_order(sorted(norms, key=norms.__getitem__), structure, blocks), time.perf_counter() - t)
    for seed in range(seeds):
        add(f"random{seed}", take_in_order(random_order(candidates, seed), structure, blocks), 0.0)
    return rows


def remeasure(rows: list[dict], rounds: int) -> None:
    """Time again, side by side in one interleaved run per model, every block-removal row (from its ``removed``
    joins) against the original: for a quiet machine after a run that shared it. LayerMerge rows keep the speed-up
    measured in their run (their plan is not in the rows)."""
    for name in dict.fromkeys(r["model"] for r in rows):
        model = load_model(ROOT / "models" / f"{name}.onnx")
        mine = [r for r in rows if r["model"] == name and "removed" in r]
        pruned = [apply_plan(model, Plan(remove_blocks=r["removed"]))[0] for r in mine]
        measured = compare([normalized(model), *pruned], get_backend("ort-cpu"), 32, rounds)
        for r, speedup in zip(mine, measured.speedups[1:]):
            r.update(speedup_in_run=r["speedup"], speedup=speedup)


def print_table(rows: list[dict]) -> None:
    """The RESULTS.md table: one line per method, the random seeds as mean ± standard deviation."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    print("| model | method | blocks removed | top-1 | healed | measured speed-up | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        for r in mine:
            if not r["method"].startswith("random"):
                merged = f" + {r['merged']} merges" if r.get("merged") else ""
                healed = f"{100 * r['healed']:.2f}%" if "healed" in r else "-"
                print(f"| {name} | {r['method']} | {r['blocks']}{merged} | {100 * r['accuracy']:.2f}% | {healed} | "
                      f"{r['speedup']:.2f}x | {r['seconds']:.1f} |")
        randoms = [r for r in mine if r["method"].startswith("random")]
        if randoms:
            accs = [100 * r["accuracy"] for r in randoms]
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            healed = [100 * r["healed"] for r in randoms if "healed" in r]
            healed_text = (f"{statistics.mean(healed):.2f}%" + (f" ± {statistics.stdev(healed):.2f}" if len(healed) > 1
                                                               else "")) if healed else "-"
            print(f"| {name} | random ({len(randoms)} seeds) | {randoms[0]['blocks']} | {statistics.mean(accs):.2f}%"
                  f"{spread} | {healed_text} | {statistics.mean(r['speedup'] for r in randoms):.2f}x | - |")
    for r in rows:
        if r["method"] == "sglp" and r["model"] == "resnet56":
            print(f"\nSGLP segments of resnet56 ({r['segments_chosen_by']}):")
            for k, s in enumerate(r["segments"]):
                print(f"  segment {k}: {', '.join(s['blocks']) or '(the stem alone)'}; removed: "
                      f"{', '.join(s['removed']) or '-'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet56,mobilenetv2")
    p.add_argument("--blocks", default="9,4", help="blocks to remove, one count per model (or one for all)")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--heal-steps", type=int, default=200, help="the healing budget of every method (0: no healing)")
    p.add_argument("--test", default=None, help="test .npz (default: the 10,000 CIFAR-10 test images)")
    p.add_argument("--json", default=None)
    p.add_argument("--remeasure", metavar="ROWS.json", help="only time again the rows of an earlier --json (see "
                   "remeasure), write them back to --json if given, and print the table")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.remeasure:
        rows = json.loads(Path(args.remeasure).read_text())
        remeasure(rows, args.rounds)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print_table(rows)
        return
    test = args.test or split_file("test")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-sglp-") as tmp:
        names = args.models.split(",")
        counts = [int(c) for c in args.blocks.split(",")]
        for name, blocks in zip(names, counts * len(names) if len(counts) == 1 else counts):
            rows += run(name, blocks, args.samples, args.seeds, args.rounds, args.heal_steps, test, Path(tmp))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\ntest data: {test}\n")
    print_table(rows)

if __name__ == "__main__":
    main()
