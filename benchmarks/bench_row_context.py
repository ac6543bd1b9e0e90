"""Latency rows timed alone against the same convs inside the network (issue "every real export prunes", item 7).

    python benchmarks/bench_row_context.py [--case mobilenetv2] [--batch 32] [--plan 8]

Takes one of ``bench_latency_table.py``'s seeded random plans (``--plan K``, the same K as there), applies it to
the normalized model and, for every latency row of the plan (``latency.table.row_model``), times the row's own
work (onnxruntime's profiler, layout conversions left out) two ways, 25 runs each, medians: alone, run after run
(warm caches: what ``build_table`` measures), and right after a run of the whole original model (the caches as the
network leaves them). Then profiles the pruned model itself: the kernel time of each node in situ, and the sum.
It tests whether rows timed alone with warm caches misjudge what they cost in the network; benchmarks/RESULTS.md
has what it found.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_latency_table import accepted, model_of, random_plans  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.graph.normalize import to_graph  # noqa: E402
from onnxprune.latency.backends import LAYOUT_OPS, ProfiledClock, get_backend  # noqa: E402
from onnxprune.latency.measure import compare, random_feeds  # noqa: E402
from onnxprune.latency.table import row_model, row_signature  # noqa: E402
from onnxprune.plan import Plan, apply_plan  # noqa: E402
from onnxprune.planning import blocks  # noqa: E402
from onnxprune.planning.candidates import conv_l1_norms, options_plan  # noqa: E402
from onnxprune.runtime.session import create_session  # noqa: E402
from onnxprune.speedup import normalized  # noqa: E402

RUNS = 25
SKIP = 5  # first runs left out of the medians


def in_situ(model, backend, batch: int) -> dict[str, float]:
    """Median kernel seconds of every node of ``model`` over RUNS profiled runs (layout conversions left out)."""
    session = create_session(model, "cpu", threads=backend.threads, profile=tempfile.mktemp()).session
    feeds = random_feeds(model, batch)
    for _ in range(RUNS):
        session.run(None, feeds)
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    times = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] not in LAYOUT_OPS:
            times[e["name"].removesuffix("_kernel_time")].append(e["dur"] * 1e-6)
    return {name: statistics.median(t[SKIP:]) for name, t in times.items()}


def row_alone(model, backend, batch: int, before=None) -> float:
    clock = ProfiledClock(model, random_feeds(model, batch), backend.threads)
    for _ in range(RUNS):
        if before is not None:
            before()
        clock()
    return statistics.median(clock.seconds()[SKIP:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="mobilenetv2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--plan", type=int, default=8)
    args = p.parse_args()
    original = load_model(model_of(args.case, Path(tempfile.mkdtemp())))
    structure = analyze_model(original)
    model = normalized(original)
    options, _ = accepted(model, blocks.search_space(structure, conv_l1_norms(to_graph(model))))
    kind, chosen = random_plans(options, blocks.positions(structure, options), args.plan + 1)[args.plan]
    pruned, _ = apply_plan(model, Plan(**options_plan([o for o in chosen if not o.original])))
    cpu = get_backend("ort-cpu")
    whole = cpu.runner(model, random_feeds(model, args.batch))
    print(f"{args.case} batch {args.batch} plan {args.plan} ({kind}); measured speed-up "
          f"{compare([model, pruned], cpu, args.batch).speedups[1]:.3f}x", flush=True)
    print("| position | row | new | alone, warm (us) | after a whole-model run (us) |")
    print("| --- | --- | --- | --- | --- |")
    sums = [0.0, 0.0]
    for o in chosen:
        signature = row_signature(o, structure, args.batch)
        if signature is None:
            continue
        row = row_model(o, structure, args.batch)
        warm, after = row_alone(row, cpu, args.batch), row_alone(row, cpu, args.batch, whole)
        sums[0] += warm
        sums[1] += after
        print(f"| {o.start}..{o.end} | {signature} | {'' if o.original else 'yes'} | {1e6 * warm:.0f} | "
              f"{1e6 * after:.0f} |", flush=True)
    nodes = in_situ(pruned, cpu, args.batch)
    print(f"\nrows summed: alone, warm {1e6 * sums[0]:.0f} us; after a whole-model run {1e6 * sums[1]:.0f} us")
    print(f"in situ, the pruned model's kernels: {1e6 * sum(nodes.values()):.0f} us in all; the original's: "
          f"{1e6 * sum(in_situ(model, cpu, args.batch).values()):.0f} us")
    for name, seconds in nodes.items():
        print(f"  {1e6 * seconds:8.0f} us  {name}")


if __name__ == "__main__":
    main()
