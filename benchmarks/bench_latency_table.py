"""How well a LayerMerge latency table predicts measured speed-ups on ort-cpu (issue 6).

    python benchmarks/bench_latency_table.py [--cases resnet56,mobilenetv2,resnet34] [--batches 1,32]
                                             [--resnet34-batch 32] [--plans 12] [--measures 3] [--wall]
                                             [--without-overhead]

For each model and batch, the table is built as ``prune --speedup`` builds it (every option of
``planning.blocks.search_space`` the rewrite accepts; rows as their own work, removable blocks timed as a
whole, the original rows and the blocks then read in situ from profiled runs of the whole model, a per-node
overhead added to rows: ``LatencyTable.node_overhead_s``), and a second time with nothing read in situ (as
tables were built before 2026-11-28: every row and block as timed alone). ``--without-overhead`` adds the
first table's measurements with the per-node overhead left out: ``node_overhead_s`` = 0, the block extras and
the fixed part recomputed (fixed = whole - the original rows without overhead), so the effect of the overhead
model shows.
``--wall`` adds the earlier variant (each row alone by wall clock minus an identity model's run, as the GPU
backends still time rows; it has no per-node overhead).

Then seeded random plans (tilings of the DP positions ``planning.blocks.positions`` by block removals, conv
prunings and merges, off-chain block removals included) are applied and measured side by side against the
original (``latency.measure.compare``), three times with fresh sessions (``--measures``), the median kept: one
measurement alone can be far off (a plan of MobileNetV2 read 1.40x once and 0.94-1.00x in six measurements
after). Error = predicted speed-up / measured speed-up - 1. The noise floor is the model measured against
itself (three side-by-side measurements). As in ``prune --speedup``, the table is built on, and plans are
measured against, the normalized original (``speedup.normalized``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.graph.normalize import to_graph, to_model  # noqa: E402
from onnxprune.latency.backends import Backend, OverheadClock, get_backend, median_time, overhead_model  # noqa: E402
from onnxprune.latency.measure import compare, random_feeds  # noqa: E402
from onnxprune.latency.table import FixedPartBelowZero, LatencyTable, _block_extras, build_table  # noqa: E402
from onnxprune.plan import Plan, PlanError, apply_plan, fingerprint  # noqa: E402
from onnxprune.planning import blocks  # noqa: E402
from onnxprune.planning.candidates import conv_l1_norms, options_plan  # noqa: E402
from onnxprune.speedup import normalized  # noqa: E402


class WallClockBackend(Backend):
    """ort-cpu with rows timed the earlier way: wall clock minus an identity model, no profiler."""

    def own_clock(self, model, feeds):
        return OverheadClock(self.runner(model, feeds), self.runner(overhead_model(feeds), {"x": next(iter(feeds.values()))}))

    def reference_runner(self, model, feeds):
        return self.runner(model, feeds)


def model_of(case: str, folder: Path) -> str:
    if case == "resnet34":
        from tests import zoo

        import torch

        torch.manual_seed(0)
        return str(zoo.export(zoo.perturb(zoo.BUILDERS["resnet34"](num_classes=10)), folder / "r34.onnx",
                              "torchscript", 224))
    return str(ROOT / "models" / f"{case}.onnx")


def without_overhead(table: LatencyTable, structure, originals) -> LatencyTable:
    """The same measurements with no per-node overhead: block extras and the fixed part recomputed."""
    bare = copy.deepcopy(table)
    bare.node_overhead_s = 0.0
    bare.block_extras = _block_extras(bare, structure, originals)
    bare.fixed_s = bare.whole_s - sum(bare.option_latency(o, structure) for o in originals)
    return bare


def accepted(model, options):
    """The options the rewrite accepts alone (as importance.layermerge.row_copies keeps them), and the refused."""
    base = to_model(to_graph(model), model)
    kept, refused = [], []
    for o in options:
        if o.original:
            kept.append(o)
            continue
        try:
            apply_plan(base, Plan(**options_plan([o])))
            kept.append(o)
        except PlanError as exc:
            refused.append((o, str(exc)))
    return kept, refused


def random_plans(options, positions: int, count: int, seed: int = 0):
    rng = random.Random(seed)
    by_start = collections.defaultdict(list)
    for o in options:
        by_start[o.start].append(o)
    plans = []
    while len(plans) < count:
        share, kind = rng.choice([0.1, 0.2, 0.4]), rng.choice(["any", "remove", "prune"])
        chosen, pos = [], 0
        while pos < positions:
            fits = [o for o in by_start[pos] if not o.original and (
                kind == "any" or (kind == "remove") == bool(o.remove_block) and (kind == "remove" or len(o.keep) == 1))]
            o = rng.choice(fits) if fits and rng.random() < share else next(o for o in by_start[pos] if o.original)
            chosen.append(o)
            pos = o.end
        if any(not o.original for o in chosen):
            plans.append((kind, chosen))
    return plans


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="resnet56,mobilenetv2,resnet34")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--resnet34-batch", type=int, default=None,
                   help="the large batch for resnet34 (default: the largest of --batches if a run of the whole "
                        "model stays under 2 s, else 8)")
    p.add_argument("--plans", type=int, default=12)
    p.add_argument("--measures", type=int, default=3,
                   help="side-by-side measurements of each plan, fresh sessions each; the median is the measured one")
    p.add_argument("--wall", action="store_true", help="also the earlier wall-clock table")
    p.add_argument("--without-overhead", action="store_true",
                   help="also the first table with the per-node overhead left out")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-table-"))
    cpu = get_backend("ort-cpu")
    wall_backend = WallClockBackend(**{k: getattr(cpu, k) for k in ("name", "threads", "device", "versions")})
    summary, details = [], []
    for case in args.cases.split(","):
        path = model_of(case, tmp)
        original = load_model(path)
        structure = analyze_model(original)
        model = normalized(original)  # the baseline prune --speedup times and measures against (speedup.py)
        options, refused = accepted(model, blocks.search_space(structure, conv_l1_norms(to_graph(model))))
        last = blocks.positions(structure, options)
        originals = [o for o in options if o.original]
        print(f"{case}: {len(options)} options ({len(refused)} refused by the rewrite) over {len(structure.convs)} "
              f"chain convs and {last - len(structure.convs)} blocks off the chain", flush=True)
        batches = [int(b) for b in args.batches.split(",")]
        if case == "resnet34":
            big = max(batches)
            if args.resnet34_batch is not None:
                big = args.resnet34_batch
            elif big > 1:
                one = median_time(cpu.runner(model, random_feeds(model, big)), 1, 3)
                print(f"{case}: one run at batch {big} takes {one:.2f} s", flush=True)
                big = big if one < 2.0 else 8
            batches = sorted({b if b == 1 else big for b in batches})
        for batch in batches:
            case_start = time.perf_counter()
            tables = {}
            variants = [("in situ", cpu, True), ("alone", cpu, False)]
            variants += [("wall", wall_backend, False)] if args.wall else []
            for name, backend, in_situ in variants:
                t0 = time.perf_counter()
                try:
                    table = build_table(model, structure, options, backend, batch, fingerprint(original),
                                        in_situ=in_situ)
                except FixedPartBelowZero as refused:
                    print(f"{case} b{batch} {name}: refused: {refused}", flush=True)
                    continue
                tables[name] = table
                print(f"{case} b{batch} {name}: {len(table.rows)} rows, {len(table.blocks)} blocks in "
                      f"{time.perf_counter() - t0:.1f} s; whole {1e3 * table.whole_s:.3f} ms, node overhead "
                      f"{1e6 * table.node_overhead_s:.2f} us x {len(to_graph(model).nodes)} nodes, "
                      f"fixed {1e3 * table.fixed_s:.3f} ms; notes {table.notes}", flush=True)
            if args.without_overhead:
                tables["in situ, no node overhead"] = without_overhead(tables["in situ"], structure, originals)
            for name, table in tables.items():
                rows = table.whole_s - table.fixed_s
                print(f"{case} b{batch} {name}: original rows {rows / table.whole_s:.3f} of the whole, "
                      f"fixed {1e3 * table.fixed_s:.3f} ms", flush=True)
            selves = [compare([model, model], cpu, batch).speedups[1] for _ in range(3)]
            print(f"{case} b{batch}: itself against itself {', '.join(f'{s:.3f}' for s in selves)}", flush=True)
            errors = collections.defaultdict(list)
            for k, (kind, chosen) in enumerate(random_plans(options, last, args.plans)):
                pruned, _ = apply_plan(model, Plan(**options_plan([o for o in chosen if not o.original])))
                reads = sorted(compare([model, pruned], cpu, batch).speedups[1] for _ in range(args.measures))
                measured = statistics.median(reads)
                changed = [o for o in chosen if not o.original]
                kinds = collections.Counter("remove" if o.remove_block else "merge" if len(o.keep) > 1 or
                                            o.fold_identity else "prune" for o in changed)
                line = (f"{case} b{batch} plan {k} ({kind}: {', '.join(f'{n} {w}' for w, n in kinds.items())}): "
                        f"measured {measured:.3f}x ({', '.join(f'{r:.3f}' for r in reads)})")
                for name, table in tables.items():
                    predicted = table.whole_s / table.predict(chosen, structure)
                    errors[name].append(predicted / measured - 1)
                    line += f", {name} predicts {predicted:.3f}x ({pct(predicted / measured - 1)})"
                print(line, flush=True)
                details.append((case, batch, k, kind, dict(kinds), measured,
                                {n: t.whole_s / t.predict(chosen, structure) for n, t in tables.items()}))
            minutes = (time.perf_counter() - case_start) / 60
            print(f"{case} b{batch}: {minutes:.1f} min", flush=True)
            for name, table in tables.items():
                e = errors[name]
                med, worst = statistics.median(abs(x) for x in e), max(abs(x) for x in e)
                goal = "yes" if med <= 0.01 and worst <= 0.03 else "NO (" + ", ".join(
                    s for s in (f"median over by {100 * (med - 0.01):.1f} pt" if med > 0.01 else "",
                                f"worst over by {100 * (worst - 0.03):.1f} pt" if worst > 0.03 else "") if s) + ")"
                rows = table.whole_s - table.fixed_s
                summary.append(f"| {case} | {batch} | {name} | {1e6 * table.node_overhead_s:.2f} | "
                               f"{rows / table.whole_s:.3f} | {pct(statistics.median(e))} | {100 * med:.1f}% | "
                               f"{100 * worst:.1f}% | {pct(min(e))} / {pct(max(e))} | {goal} | "
                               f"{min(selves):.3f}-{max(selves):.3f} | {minutes:.1f} |")
    print()
    print(f"{args.plans} random plans per model and batch, ort-cpu, {cpu.device}; error = predicted / measured - 1")
    print("| model | batch | table | node overhead us | original rows / whole | error (median) | median abs error "
          "| worst abs error | min / max | goal (median <= 1%, worst <= 3%) | itself vs itself | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
