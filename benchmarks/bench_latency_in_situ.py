"""Original rows and blocks read in situ, from a profile of the whole model, against rows timed alone (a diagnosis
for issue "every real export prunes", item 7; not what ``prune`` does).

    python benchmarks/bench_latency_in_situ.py [--cases resnet56,mobilenetv2] [--batches 1,32] [--plans 12]

For each model and batch, the latency table is built as ``prune --speedup`` builds it (``latency.table.build_table``:
every row timed alone, as its own work). A second table is derived from it: every original row (a chain conv
and its activation) and every residual block's branch gets the share of the whole model's run that its nodes'
kernels take in situ, in a profiled run of the whole model (30 runs in a row, the first 5 left out; onnxruntime's
fused kernels are mapped back to the graph node whose name, or whose output tensor's name plus ``_nchwc``, they
carry), times the table's whole model; an original row's signature gets the mean over the positions that share it.
New rows (merges, prunings) keep the time they were given alone. Then the same seeded random plans as
``bench_latency_table.py`` are measured (three side-by-side measurements, the median) and each table's error
(predicted / measured speed-up - 1) printed. It tests whether the rows the original network already has are
better read from the network itself than timed alone.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_latency_table import accepted, model_of, random_plans  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.graph.normalize import to_graph  # noqa: E402
from onnxprune.latency.backends import LAYOUT_OPS, get_backend  # noqa: E402
from onnxprune.latency.measure import compare, random_feeds  # noqa: E402
from onnxprune.latency.table import _block_extras, build_table, row_signature  # noqa: E402
from onnxprune.plan import Plan, apply_plan  # noqa: E402
from onnxprune.planning import blocks  # noqa: E402
from onnxprune.planning.candidates import conv_l1_norms, options_plan  # noqa: E402
from onnxprune.runtime.session import create_session  # noqa: E402
from onnxprune.speedup import normalized  # noqa: E402

RUNS, SKIP = 30, 5


def in_situ_shares(model, batch: int) -> dict[str, float]:
    """Graph node name -> median share of a profiled run of the whole model that its kernels take."""
    producer = {tensor: node.name for node in model.graph.node for tensor in node.output}
    names = {node.name for node in model.graph.node}
    session = create_session(model, "cpu", profile=tempfile.mktemp()).session
    feeds = random_feeds(model, batch)
    walls = []
    for _ in range(RUNS):
        start = time.perf_counter()
        session.run(None, feeds)
        walls.append(time.perf_counter() - start)
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    per_run: dict[str, list[list[float]]] = collections.defaultdict(lambda: [[] for _ in range(RUNS)])
    seen: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] not in LAYOUT_OPS:
            kernel = e["name"].removesuffix("_kernel_time")
            node = kernel if kernel in names else producer.get(kernel.removesuffix("_nchwc"))
            if node is None:
                print(f"  a kernel mapped to no node: {kernel}")
                continue
            run = seen[kernel]
            seen[kernel] += 1
            per_run[node][run].append(e["dur"] * 1e-6)
    return {node: statistics.median(sum(ts) / w for ts, w in zip(runs[SKIP:], walls[SKIP:]))
            for node, runs in per_run.items()}


def in_situ_table(table, structure, options, model, batch: int):
    """``table`` with its original rows and blocks read in situ (module doc)."""
    shares = in_situ_shares(model, batch)
    situ = copy.deepcopy(table)
    by_signature = collections.defaultdict(list)
    for o in options:
        if o.original and o.keep_block is None:
            conv = structure.convs[o.start]
            nodes = [conv.name, *conv.activation_nodes]
            by_signature[row_signature(o, structure, batch)].append(sum(shares.get(n, 0.0) for n in nodes))
    for signature, values in by_signature.items():
        situ.rows[signature] = float(np.mean(values)) * situ.whole_s
    for block in structure.residual_blocks:
        if block.join in situ.blocks:
            situ.blocks[block.join] = sum(shares.get(n, 0.0) for n in block.branch_nodes) * situ.whole_s
    originals = [o for o in options if o.original]
    situ.block_extras = _block_extras(situ, structure, originals)
    situ.fixed_s = situ.whole_s - sum(situ.option_latency(o, structure) for o in originals)
    return situ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="resnet56,mobilenetv2")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--plans", type=int, default=12)
    args = p.parse_args()
    cpu = get_backend("ort-cpu")
    summary = []
    for case in args.cases.split(","):
        original = load_model(model_of(case, Path(tempfile.mkdtemp())))
        structure = analyze_model(original)
        model = normalized(original)
        options, _ = accepted(model, blocks.search_space(structure, conv_l1_norms(to_graph(model))))
        last = blocks.positions(structure, options)
        for batch in (int(b) for b in args.batches.split(",")):
            alone = build_table(model, structure, options, cpu, batch, "diagnosis")
            tables = {"alone": alone, "in situ": in_situ_table(alone, structure, options, model, batch)}
            print(f"{case} b{batch}: fixed part " + ", ".join(f"{name} {t.fixed_s / t.whole_s:.3f}"
                                                             for name, t in tables.items()) + " of the whole")
            errors = collections.defaultdict(list)
            for k, (kind, chosen) in enumerate(random_plans(options, last, args.plans)):
                pruned, _ = apply_plan(model, Plan(**options_plan([o for o in chosen if not o.original])))
                measured = statistics.median(compare([model, pruned], cpu, batch).speedups[1] for _ in range(3))
                line = f"  plan {k} ({kind}): measured {measured:.3f}x"
                for name, table in tables.items():
                    error = table.whole_s / table.predict(chosen, structure) / measured - 1
                    errors[name].append(error)
                    line += f", {name} {100 * error:+.1f}%"
                print(line, flush=True)
            for name, e in errors.items():
                summary.append(f"| {case} | {batch} | {name} | {100 * statistics.median(map(abs, e)):.1f}% | "
                               f"{100 * max(map(abs, e)):.1f}% | {100 * min(e):+.1f}% / {100 * max(e):+.1f}% |")
    print("\n| model | batch | original rows and blocks | median abs error | worst abs error | min / max |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
