"""Cost of SLP scoring: suffix-only (each candidate runs only the network after its block, on the
block's captured input) against running the whole pruned network per candidate (issue 5).

    python benchmarks/bench_slp_cost.py [--repeats 2]

For ResNet-56 (models/resnet56.onnx, 512 calibration images, 32x32) and a ResNet-50 at 224x224
(tests/zoo.py, random weights, 64 random inputs): each measurement runs in its own process, so
its peak resident memory is its own; the modes alternate (A B A B) and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(model_path: str, data: str, samples: int, suffix_only: bool, batch: int) -> None:
    from onnxprune.data.sources import load_data
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.graph.io import load_model
    from onnxprune.importance.slp import removal_candidates, score_blocks
    from onnxprune.runtime.capture import feature_tensor

    model = load_model(model_path)
    dataset = load_data(data, model, samples=samples)
    blocks = removal_candidates(analyze_model(model), 0)
    t0 = time.perf_counter()
    run = score_blocks(model, dataset, blocks, feature_tensor(model), "cpu", batch=batch, suffix_only=suffix_only)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "blocks": len(blocks), "samples": len(dataset),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "scores": [s.score for s in run.scores]}))


def measure(model_path: str, data: str, samples: int, batch: int, repeats: int) -> dict:
    results: dict[str, list[dict]] = {"suffix": [], "whole": []}
    for _ in range(repeats):
        for mode in ("suffix", "whole"):
            out = subprocess.run([sys.executable, __file__, "--child", model_path, data, str(samples), mode, str(batch)],
                                 capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    same = max(abs(a - b) for a, b in zip(results["suffix"][0]["scores"], results["whole"][0]["scores"]))
    summary = {mode: {"seconds": statistics.median(r["seconds"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for mode, rs in results.items()}
    summary.update(blocks=results["suffix"][0]["blocks"], samples=results["suffix"][0]["samples"], max_score_diff=same)
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model_path, data, samples, mode, batch = sys.argv[2:7]
        child(model_path, data, int(samples), mode == "suffix", int(batch))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--resnet56", default=str(ROOT / "models" / "resnet56.onnx"))
    args = p.parse_args()
    from tests import zoo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r50 = zoo.export(zoo.perturb(zoo.BUILDERS["resnet50"]()), Path(tmp) / "resnet50.onnx", "torchscript", 224)
        cases = [("ResNet-56, 32x32", args.resnet56, str(ROOT / "models" / "cifar10_calib512.npz"), 512, 64),
                 ("ResNet-50, 224x224", str(r50), "random", 64, 16)]
        for name, path, data, samples, batch in cases:
            r = measure(path, data, samples, batch, args.repeats)
            rows.append((name, r))
            print(name, json.dumps(r), flush=True)
    print()
    print("| model | candidates | samples | suffix-only s | whole network s | ratio | suffix peak RSS MB | whole peak RSS MB | max score diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['blocks']} | {r['samples']} | {r['suffix']['seconds']:.2f} | {r['whole']['seconds']:.2f} | "
              f"{r['whole']['seconds'] / r['suffix']['seconds']:.2f}x | {r['suffix']['peak_rss_mb']:.0f} | "
              f"{r['whole']['peak_rss_mb']:.0f} | {r['max_score_diff']:.1e} |")


if __name__ == "__main__":
    main()
