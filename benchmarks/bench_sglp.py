"""SGLP against SLP, random and L1-norm block removal (issue 14; docs/algorithms.md section 3).

    python benchmarks/bench_sglp.py [--models resnet56,mobilenetv2] [--blocks 6] [--samples 512] [--seeds 5]
                                    [--rounds 25] [--test PATH.npz] [--json OUT.json]

For each model the same number of blocks (``--blocks``) is removed by SGLP (segments at the elbow, GradNorm with
the calibration labels), SLP (iterative, re-scored after each removal), random orders (``--seeds`` seeds) and the
smallest L1 norm of the branch weights (onnxprune.importance.baselines), the last two keeping one block per stage
as SLP does. The calibration data is the shipped 512 images (``--samples`` of them). Each pruned model is
evaluated without fine-tuning on the 10,000 CIFAR-10 test images (``--test`` for another file, e.g. the shipped
models/cifar10_test1000.npz for a quick run) and timed side by side with the original on ort-cpu at batch 32
(measured speed-up); the wall time of each method's choice is reported. For ResNet-56, SGLP's segments are printed
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
from onnxprune.importance.baselines import l1_norms, random_order  # noqa: E402
from onnxprune.importance.sglp import prune_sglp  # noqa: E402
from onnxprune.importance.slp import prune_slp, removal_candidates, take_in_order  # noqa: E402
from onnxprune.latency.backends import get_backend  # noqa: E402
from onnxprune.latency.measure import compare  # noqa: E402
from onnxprune.plan import Plan, apply_plan  # noqa: E402
from onnxprune.runtime.capture import feature_tensor  # noqa: E402
from onnxprune.speedup import normalized  # noqa: E402


def evaluate(model, joins: list[str], folder: Path, tag: str, test: str, rounds: int) -> dict:
    pruned, _ = apply_plan(model, Plan(remove_blocks=joins))
    path = folder / f"{tag}.onnx"
    save_model(pruned, path)
    measured = compare([normalized(model), pruned], get_backend("ort-cpu"), 32, rounds)
    return {"accuracy": accuracy(str(path), test), "speedup": measured.speedups[1]}


def run(name: str, blocks: int, samples: int, seeds: int, rounds: int, test: str, folder: Path) -> list[dict]:
    model = load_model(ROOT / "models" / f"{name}.onnx")
    data = load_data(str(ROOT / "models" / "cifar10_calib512.npz"), model, samples=samples)
    structure = analyze_model(model)
    candidates = removal_candidates(structure, 1)
    original = accuracy(str(ROOT / "models" / f"{name}.onnx"), test)
    rows = [{"model": name, "method": "original", "blocks": 0, "accuracy": original, "speedup": 1.0, "seconds": 0.0}]

    def add(method: str, joins: list[str], seconds: float, **extra) -> None:
        row = {"model": name, "method": method, "blocks": len(joins), "removed": joins, "seconds": seconds, **extra}
        row.update(evaluate(model, joins, folder, f"{name}_{method}", test, rounds))
        rows.append(row)
        print(json.dumps(row), flush=True)

    t = time.perf_counter()
    result = prune_sglp(model, data, remove_blocks=blocks)
    predicted = result.plan.predicted
    segments = [{"blocks": s["blocks"], "removed": [j for j in s["blocks"] if j in result.plan.remove_blocks]}
                for s in predicted["segments"]]
    add("sglp", result.plan.remove_blocks, time.perf_counter() - t, segments=segments,
        segments_chosen_by=predicted["segments_chosen_by"])
    t = time.perf_counter()
    slp = prune_slp(model, data, feature_tensor(model), remove_blocks=blocks)
    add("slp", slp.plan.remove_blocks, time.perf_counter() - t)
    t = time.perf_counter()
    norms = l1_norms(model, candidates)
    add("l1", take_in_order(sorted(norms, key=norms.__getitem__), structure, blocks), time.perf_counter() - t)
    for seed in range(seeds):
        add(f"random{seed}", take_in_order(random_order(candidates, seed), structure, blocks), 0.0)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet56,mobilenetv2")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--test", default=None, help="test .npz (default: the 10,000 CIFAR-10 test images)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    test = args.test or split_file("test")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-sglp-") as tmp:
        for name in args.models.split(","):
            rows += run(name, args.blocks, args.samples, args.seeds, args.rounds, test, Path(tmp))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\ntest data: {test}\n")
    print("| model | method | blocks removed | top-1 | measured speed-up | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        mine = [r for r in rows if r["model"] == name]
        for r in mine:
            if not r["method"].startswith("random"):
                print(f"| {name} | {r['method']} | {r['blocks']} | {100 * r['accuracy']:.2f}% | {r['speedup']:.2f}x | "
                      f"{r['seconds']:.1f} |")
        randoms = [r for r in mine if r["method"].startswith("random")]
        if randoms:
            accs = [100 * r["accuracy"] for r in randoms]
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            print(f"| {name} | random ({len(randoms)} seeds) | {randoms[0]['blocks']} | {statistics.mean(accs):.2f}%"
                  f"{spread} | {statistics.mean(r['speedup'] for r in randoms):.2f}x | - |")
    for r in rows:
        if r["method"] == "sglp" and r["model"] == "resnet56":
            print(f"\nSGLP segments of resnet56 ({r['segments_chosen_by']}):")
            for k, s in enumerate(r["segments"]):
                print(f"  segment {k}: {', '.join(s['blocks']) or '(the stem alone)'}; removed: "
                      f"{', '.join(s['removed']) or '-'}")


if __name__ == "__main__":
    main()
