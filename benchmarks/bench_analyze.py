"""Cost of loading and analyzing full-size models (issue: analysis of ResNet-50 well under a second).

    python benchmarks/bench_analyze.py [--models resnet50,vit_b_16] [--repeats 5]

Exports each tests/zoo.py model at full size (224x224) with both torch exporters into a temporary
folder, then times load_model (parse, validation, shape inference) and analyze_model (normalize,
dominators, blocks, chain) separately; prints the median of the repeats and the block counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from tests import zoo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print("| model | exporter | nodes | file MB | load s (median) | analyze s (median) | blocks (projection) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for exporter in ("torchscript", "dynamo"):
                path = zoo.export(zoo.perturb(zoo.BUILDERS[name]()), Path(tmp) / f"{name}_{exporter}.onnx", exporter, 224)
                loads, analyses = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    model = load_model(path)
                    t1 = time.perf_counter()
                    structure = analyze_model(model)
                    t2 = time.perf_counter()
                    loads.append(t1 - t0)
                    analyses.append(t2 - t1)
                projections = sum(b.shortcut == "projection" for b in structure.residual_blocks)
                print(f"| {name} | {exporter} | {len(model.graph.node)} | {path.stat().st_size / 1e6:.1f} | "
                      f"{statistics.median(loads):.3f} | {statistics.median(analyses):.3f} | "
                      f"{len(structure.residual_blocks)} ({projections}) |", flush=True)


if __name__ == "__main__":
    main()
