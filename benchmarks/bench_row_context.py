"""Latency rows timed alone against the same convs inside the network (issue "every real export prunes", item 7).

    python benchmarks/bench_row_context.py [--case mobilenetv2] [--batch 32] [--plan 8] [--side-by-side | --side-branch]

Takes one of ``bench_latency_table.py``'s seeded random plans (``--plan K``, the same K as there), applies it to
the normalized model and, for every latency row of the plan (``latency.table.row_model``), times the row's own
work (onnxruntime's profiler, layout conversions left out) two ways, 25 runs each, medians: alone, run after run
(warm caches: what ``build_table`` measures), and right after a run of the whole original model (the caches as the
network leaves them). Then profiles the pruned model itself: the kernel time of each node in situ, and the sum.
It tests whether rows timed alone with warm caches misjudge what they cost in the network; benchmarks/RESULTS.md
has what it found.

``--side-by-side``: instead, the original and the pruned model profiled in turns (A B, B A, ... as
``measure.compare`` times them), per node, beside the latency table ``prune`` would build. The pruned model's nodes
are split into those the original has too (same name, same parameter bytes) and the new ones, and each part is
given as a share of the original's kernel time, in situ and as the table predicts it: it tells whether a
misprediction lies in the new rows or in what the unchanged nodes cost in the new network.

``--side-branch``: each new row of the plan timed three ways in turns: alone (as the table times it), as a side
branch of the original network (the row's conv reads the tensor it would read in the pruned model, right after it
is made; its output an extra graph output), and in situ in the pruned model. It tests whether timing rows inside
the original network would predict what they cost in the pruned one.
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
from pathlib import Path

import numpy as np
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_latency_table import accepted, model_of, random_plans  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.graph.normalize import to_graph  # noqa: E402
from onnxprune.latency.backends import LAYOUT_OPS, ProfiledClock, get_backend  # noqa: E402
from onnxprune.latency.measure import compare, random_feeds  # noqa: E402
from onnxprune.latency.table import build_table, row_model, row_signature  # noqa: E402
from onnxprune.plan import Plan, apply_plan  # noqa: E402
from onnxprune.planning import blocks  # noqa: E402
from onnxprune.planning.candidates import conv_l1_norms, options_plan  # noqa: E402
from onnxprune.runtime.session import create_session  # noqa: E402
from onnxprune.speedup import normalized  # noqa: E402

RUNS = 25
SKIP = 5  # first runs left out of the medians


def in_situ(model, backend, batch: int) -> dict[str, float]:
    """Median kernel seconds of every node of ``model`` over RUNS profiled runs (layout conversions left out)."""
    medians = node_medians(profiled_in_turns([model], backend, batch, RUNS)[0])
    return {name: seconds for (name, _), seconds in medians.items()}


def row_alone(model, backend, batch: int, before=None) -> float:
    clock = ProfiledClock(model, random_feeds(model, batch), backend.threads)
    for _ in range(RUNS):
        if before is not None:
            before()
        clock()
    return statistics.median(clock.seconds()[SKIP:])


def profiled_in_turns(models, backend, batch: int, rounds: int = 40) -> list[list[dict]]:
    """Per model, per round, {(node, parameter bytes): kernel seconds}; the models profiled in turns, the order
    alternating between rounds (layout conversions left out)."""
    sessions = [create_session(m, "cpu", threads=backend.threads, profile=tempfile.mktemp()).session for m in models]
    feeds = [random_feeds(m, batch) for m in models]
    for session, feed in zip(sessions, feeds):
        for _ in range(SKIP):
            session.run(None, feed)
    for r in range(rounds):
        for k in (range(len(models)) if r % 2 == 0 else reversed(range(len(models)))):
            sessions[k].run(None, feeds[k])
    result = []
    for session in sessions:
        path = session.end_profiling()
        events = json.loads(Path(path).read_text())
        os.remove(path)
        runs: list[dict] = []
        counts: dict = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] not in LAYOUT_OPS:
                key = (e["name"].removesuffix("_kernel_time"), int(e["args"].get("parameter_size", 0)))
                k = counts[key]
                counts[key] += 1
                while len(runs) <= k:
                    runs.append({})
                runs[k][key] = e["dur"] * 1e-6
        result.append(runs[SKIP:])
    return result


def node_medians(runs: list[dict]) -> dict:
    """{node key: median seconds} over the runs ``profiled_in_turns`` gives for one model."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def parameter_bytes(row) -> int:
    """The bytes of a row model's weight and bias, as onnxruntime's profile counts a node's parameters."""
    return sum(numpy_helper.to_array(t).nbytes for t in row.graph.initializer if t.name in ("w", "b"))


def side_by_side(model, pruned, chosen, structure, options, batch: int) -> None:
    """The pruned model against the original, per node, in situ and as the latency table predicts (module doc)."""
    cpu = get_backend("ort-cpu")
    table = build_table(model, structure, options, cpu, batch, "diagnosis")
    rows_s = table.whole_s - table.fixed_s
    predicted = table.whole_s / table.predict(chosen, structure)
    changed = [o for o in chosen if not o.original]
    new_rows = sum(table.option_latency(o, structure) for o in changed)
    measured = compare([model, pruned], cpu, batch).speedups[1]
    original_runs, pruned_runs = profiled_in_turns([model, pruned], cpu, batch)
    kernel_ratio = statistics.median(sum(o.values()) / sum(p.values()) for o, p in zip(original_runs, pruned_runs))
    in_original, in_pruned = node_medians(original_runs), node_medians(pruned_runs)
    total = sum(in_original.values())
    same = [key for key in in_pruned if key in in_original]
    new = [key for key in in_pruned if key not in in_original]
    print(f"measured speed-up {measured:.3f}x (unprofiled), {kernel_ratio:.3f}x in kernel time (profiled, in turns); "
          f"the table predicts {predicted:.3f}x (fixed part {table.fixed_s / table.whole_s:.1%} of the whole)")
    print("| part of the pruned model | nodes | in situ, share of the original's kernels | table, share of the "
          "original's rows |")
    print("| --- | --- | --- | --- |")
    kept_rows = table.predict(chosen, structure) - table.fixed_s - new_rows
    print(f"| unchanged nodes | {len(same)} | {sum(in_pruned[k] for k in same) / total:.3f} (the same nodes in the "
          f"original: {sum(in_original[k] for k in same) / total:.3f}) | {kept_rows / rows_s:.3f} |")
    print(f"| new nodes (merges, prunings) | {len(new)} | {sum(in_pruned[k] for k in new) / total:.3f} | "
          f"{new_rows / rows_s:.3f} |")
    print("\n| new row | table (us) | in situ (us) | node in situ |\n| --- | --- | --- | --- |")
    by_size = {key[1]: key for key in new}  # a row finds its node by its parameters' size
    for o in changed:
        signature = row_signature(o, structure, batch)
        if signature is None:
            continue
        key = by_size.get(parameter_bytes(row_model(o, structure, batch)))
        situ = f"{1e6 * in_pruned[key]:.0f} | {key[0]}" if key else "- | (no new node with these parameters)"
        print(f"| {signature} | {1e6 * table.rows[signature]:.0f} | {situ} |")
    print("\nthe unchanged nodes that moved most (us, in the original -> in the pruned model):")
    for key in sorted(same, key=lambda k: -abs(in_pruned[k] - in_original[k]))[:8]:
        print(f"  {1e6 * in_original[key]:8.0f} -> {1e6 * in_pruned[key]:8.0f}  {key[0]}")


def with_side_branch(model, option, structure, batch: int):
    """``model`` with the row of ``option`` attached where it would run: its conv reads the input of the option's
    first conv, its nodes follow that tensor's producer, its output ``side_y`` is an extra graph output."""
    row = row_model(option, structure, batch)
    joined = copy.deepcopy(model)
    graph = joined.graph
    source = next(n for n in graph.node if n.name == structure.convs[option.start].name).input[0]
    rename = {"x": source}
    for tensor in row.graph.initializer:
        rename[tensor.name] = "side_" + tensor.name
        graph.initializer.append(copy.deepcopy(tensor))
        graph.initializer[-1].name = rename[tensor.name]
    side = []
    for k, node in enumerate(row.graph.node):
        side.append(copy.deepcopy(node))
        side[-1].name = f"side_node{k}"
        side[-1].input[:] = [rename.get(x, "side_" + x) for x in node.input]
        side[-1].output[:] = ["side_" + y for y in node.output]
    nodes = list(graph.node)
    after = next((k + 1 for k, n in enumerate(nodes) if source in n.output), 0)
    graph.ClearField("node")
    graph.node.extend(nodes[:after] + side + nodes[after:])
    out = row.graph.output[0].type.tensor_type
    graph.output.append(helper.make_tensor_value_info("side_y", out.elem_type, [d.dim_value for d in out.shape.dim]))
    return joined


def side_branch(model, pruned, chosen, structure, batch: int) -> None:
    """Each new row alone, as a side branch of the original network, and in situ in the pruned model (module doc)."""
    cpu = get_backend("ort-cpu")
    new = [o for o in chosen if not o.original and o.fitted_map is None
           and row_signature(o, structure, batch) is not None]
    rows = [row_model(o, structure, batch) for o in new]
    models = [pruned, *(with_side_branch(model, o, structure, batch) for o in new), *rows]
    runs = profiled_in_turns(models, cpu, batch)
    medians = [node_medians(model_runs) for model_runs in runs]
    print("| new row | alone (us) | side branch of the original (us) | in situ (us) |\n| --- | --- | --- | --- |")
    totals = np.zeros(3)
    for k, (o, row) in enumerate(zip(new, rows)):
        situ = [seconds for key, seconds in medians[0].items() if key[1] == parameter_bytes(row)]
        times = np.array([sum(medians[1 + len(new) + k].values()),
                          sum(seconds for key, seconds in medians[1 + k].items() if key[0].startswith("side_")),
                          situ[0] if len(situ) == 1 else np.nan])
        totals += times if len(situ) == 1 else 0
        print(f"| {row_signature(o, structure, batch)} | " + " | ".join(f"{1e6 * t:.0f}" for t in times) + " |")
    print("| the rows matched to one node in situ, summed | " + " | ".join(f"{1e6 * t:.0f}" for t in totals) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="mobilenetv2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--plan", type=int, default=8)
    p.add_argument("--side-by-side", action="store_true", help="profile the original and the pruned model in turns")
    p.add_argument("--side-branch", action="store_true", help="time the new rows alone, as side branches, in situ")
    args = p.parse_args()
    original = load_model(model_of(args.case, Path(tempfile.mkdtemp())))
    structure = analyze_model(original)
    model = normalized(original)
    options, _ = accepted(model, blocks.search_space(structure, conv_l1_norms(to_graph(model))))
    kind, chosen = random_plans(options, blocks.positions(structure, options), args.plan + 1)[args.plan]
    pruned, _ = apply_plan(model, Plan(**options_plan([o for o in chosen if not o.original])))
    if args.side_by_side:
        print(f"{args.case} batch {args.batch} plan {args.plan} ({kind})", flush=True)
        return side_by_side(model, pruned, chosen, structure, options, args.batch)
    if args.side_branch:
        print(f"{args.case} batch {args.batch} plan {args.plan} ({kind})", flush=True)
        return side_branch(model, pruned, chosen, structure, args.batch)
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
