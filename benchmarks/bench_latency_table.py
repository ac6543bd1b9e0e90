"""How well a LayerMerge latency table predicts measured speed-ups on ort-cpu (issue 6).

    python benchmarks/bench_latency_table.py [--cases mobilenetv2,resnet56,resnet34] [--plans 12]

For each model, two tables from the same rows: "wall" times each row alone by wall clock minus an
identity model's run (the earlier method, still the one for GPU backends); "own work" times each row
as onnxruntime's profiled kernel time without layout conversions, as a share of the whole model in
the same round (what ort-cpu does now). Then random plans (seeded tilings of the DP positions by
block removals, conv prunings and merges) are applied and measured side by side against the
original; the table's predicted speed-up is compared with the measured one. The noise floor is the
model measured against itself.
"""

from __future__ import annotations

import argparse
import collections
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
from onnxprune.graph.normalize import to_graph  # noqa: E402
from onnxprune.latency.backends import (Backend, OverheadClock, ProfiledClock, get_backend, median_time,  # noqa: E402
                                        overhead_model)
from onnxprune.latency.measure import compare, random_feeds  # noqa: E402
from onnxprune.latency.table import build_table  # noqa: E402
from onnxprune.plan import Plan, apply_plan, fingerprint  # noqa: E402
from onnxprune.planning.candidates import conv_l1_norms, enumerate_options, options_plan  # noqa: E402


class WallClockBackend(Backend):
    """ort-cpu with rows timed the earlier way: wall clock minus an identity model, no profiler."""

    def own_clock(self, model, feeds):
        return OverheadClock(self.runner(model, feeds), self.runner(overhead_model(feeds), {"x": next(iter(feeds.values()))}))

    def reference_runner(self, model, feeds):
        return self.runner(model, feeds)


def model_of(case: str, folder: Path) -> tuple[str, int]:
    if case == "resnet34":
        from tests import zoo

        import torch

        torch.manual_seed(0)
        return str(zoo.export(zoo.perturb(zoo.BUILDERS["resnet34"](num_classes=10)), folder / "r34.onnx",
                              "torchscript", 224)), 1
    return str(ROOT / "models" / f"{case}.onnx"), 32


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="mobilenetv2,resnet56,resnet34")
    p.add_argument("--plans", type=int, default=12)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-table-"))
    cpu = get_backend("ort-cpu")
    wall_backend = WallClockBackend(**{k: getattr(cpu, k) for k in ("name", "threads", "device", "versions")})
    summary = []
    for case in args.cases.split(","):
        path, batch = model_of(case, tmp)
        model = load_model(path)
        structure = analyze_model(model)
        options = enumerate_options(structure, conv_l1_norms(to_graph(model)))
        tables = {}
        for name, backend in (("wall", wall_backend), ("own work", cpu)):
            t0 = time.perf_counter()
            table = build_table(model, structure, options, backend, batch, fingerprint(model))
            tables[name] = table
            rows = table.whole_s - table.fixed_s
            print(f"{case} b{batch} {name}: {len(table.rows)} rows in {time.perf_counter() - t0:.1f} s; "
                  f"whole {1e3 * table.whole_s:.2f} ms, original rows sum {1e3 * rows:.2f} ms "
                  f"({rows / table.whole_s:.2f} of the whole), fixed {1e3 * table.fixed_s:.2f} ms", flush=True)
        feeds = random_feeds(model, batch)
        plain, profiled = cpu.runner(model, feeds), ProfiledClock(model, feeds, cpu.threads)
        for run in (plain, profiled):
            median_time(run, 3, 1)
        turns = [(median_time(plain, 0, 1), median_time(profiled, 0, 1)) for _ in range(40)]
        print(f"{case}: whole model {1e3 * statistics.median(a for a, _ in turns):.2f} ms plain, "
              f"{1e3 * statistics.median(b for _, b in turns):.2f} ms under the profiler, taking turns", flush=True)
        selves = [compare([model, model], cpu, batch).speedups[1] for _ in range(3)]
        print(f"{case}: itself against itself {', '.join(f'{s:.3f}' for s in selves)}", flush=True)
        errors = collections.defaultdict(list)
        for k, (kind, chosen) in enumerate(random_plans(options, len(structure.convs), args.plans)):
            pruned, _ = apply_plan(model, Plan(**options_plan([o for o in chosen if not o.original])))
            measured = compare([model, pruned], cpu, batch).speedups[1]
            line = f"{case} plan {k} ({kind}, {sum(not o.original for o in chosen)} rows changed): measured {measured:.3f}x"
            for name, table in tables.items():
                predicted = table.whole_s / table.predict(chosen, structure)
                errors[name].append(measured / predicted - 1)
                line += f", {name} predicts {predicted:.3f}x"
            print(line, flush=True)
        for name in tables:
            e = errors[name]
            rows = tables[name].whole_s - tables[name].fixed_s
            summary.append(f"| {case} | {batch} | {name} | {rows / tables[name].whole_s:.2f} | "
                           f"{100 * statistics.median(e):+.1f}% | {100 * statistics.median(abs(x) for x in e):.1f}% | "
                           f"{100 * min(e):+.1f}% / {100 * max(e):+.1f}% | "
                           f"{min(selves):.3f}-{max(selves):.3f} |")
    print()
    print(f"{args.plans} random plans per model, ort-cpu, {cpu.device}")
    print("| model | batch | rows timed as | original rows / whole | measured/predicted - 1 (median) | median abs error "
          "| min / max | itself vs itself |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
