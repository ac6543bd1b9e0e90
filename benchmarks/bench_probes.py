"""An experiment, not adopted: new latency rows read in situ from probes (issue 11, item 7, MobileNetV2).

    python benchmarks/bench_probes.py [--cases mobilenetv2] [--batches 32,1] [--regime off|stop] [--plans 12]
                                      [--measures 3] [--repeats 1]

A LatencyTable reads the original rows in situ, from profiled runs of the whole model; a new row (a merge, a pruned
segment) has no place there, so it costs what it cost timed alone times what the network makes of the original rows
it replaces (LatencyTable.row_seconds). MobileNetV2's merge-heavy plan 8 of ``bench_latency_table.py`` has been the
worst prediction at batch 32, and a profile of the pruned model put most of the error in its new dense merges.

Here the new rows are read where they run: they are packed into probes, rewritten models that each hold options
that do not overlap on the chain (the rest stays original), greedy by start. Each probe is profiled in turns with the original's profiled run, and a row costs its nodes' share of the
probe's run x (probe run / original run) x the table's whole model. The same random plans as
``bench_latency_table.py`` (seed 0) are then predicted by the table with and without the probed rows and measured
side by side (``measure.compare``, ``--measures`` times, the median kept).

``--regime stop`` times every session with its threads spinning during a run and stopped when it returns
(``session.force_spinning_stop``), as ``bench_thread_regimes.py`` does; ``off`` (the default) is onnxprune's own
regime, spinning off. ``--repeats`` runs the whole measurement again (tables and plans), to show how much of the
error moves from one run to the next.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402

from bench_latency_table import accepted, model_of, random_plans  # noqa: E402
from onnxprune.graph.analysis import Structure, analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.graph.normalize import to_graph, to_model  # noqa: E402
from onnxprune.latency.backends import Backend, _timed, get_backend, median_time  # noqa: E402
from onnxprune.latency.measure import compare, random_feeds  # noqa: E402
from onnxprune.latency.table import LatencyTable, build_table  # noqa: E402
from onnxprune.plan import Plan, PlanError, PreparedModel, apply_plan, apply_prepared, fingerprint  # noqa: E402
from onnxprune.planning import blocks  # noqa: E402
from onnxprune.planning.candidates import Option, conv_l1_norms, options_plan  # noqa: E402
from onnxprune.speedup import normalized  # noqa: E402


def option_key(option: Option) -> str:
    return f"{option.start}-{option.end} {option.keep} {option.drop} {option.drop_activations} {option.fold_identity}"


def new_rows(options: list[Option]) -> list[Option]:
    """Chain options whose row the original network does not have: merges and pruned segments."""
    return [o for o in options if not o.original and o.remove_block is None and o.keep_block is None
            and o.fitted_map is None]


def pack(options: list[Option]) -> list[list[Option]]:
    """Probes of options that share no chain position: each pass down the chain takes every option that starts
    where the last one taken ends, or later."""
    left, probes = sorted(options, key=lambda o: (o.start, o.end)), []
    while left:
        taken, rest, free_from = [], [], 0
        for o in left:
            if o.start >= free_from:
                taken.append(o)
                free_from = o.end
            else:
                rest.append(o)
        probes.append(taken)
        left = rest
    return probes


def probe_rows(model: onnx.ModelProto, structure: Structure, options: list[Option], backend: Backend, batch: int,
               whole_s: float, rounds: int = 20, warmup: int = 3) -> tuple[dict[str, float], float, int]:
    """(option_key -> seconds of the new row in situ, the profiler's cost as profiled run / run, probes)."""
    feeds = random_feeds(model, batch)
    reference = backend.reference_runner(model, feeds)  # ort-cpu: a ProfiledClock of the whole model
    profiler_cost = median_time(reference, warmup, rounds) / whole_s
    base = to_model(to_graph(model), model)
    prepared = PreparedModel(base, to_graph(base), structure)
    seconds: dict[str, float] = {}
    pending, probes = pack(new_rows(options)), 0
    while pending:
        probe = pending.pop(0)
        try:
            rewritten, summary = apply_prepared(prepared, Plan(**options_plan(probe)))
        except PlanError:  # accepted alone, refused together: halves
            pending[:0] = [probe[:len(probe) // 2], probe[len(probe) // 2:]] if len(probe) > 1 else []
            continue
        clock = backend.own_clock(rewritten, feeds)
        for _ in range(warmup):
            clock()
            reference()
        reference_walls = []
        for _ in range(rounds):
            reference_walls.append(_timed(reference))
            clock()
        ratio = statistics.median(w / r for w, r in zip(clock.walls[warmup:], reference_walls))
        shares = clock.node_shares()
        into = {tuple(entry["convs"]): entry["into"] for entry in summary["merged"]}
        for o in probe:
            nodes = [into.get(o.keep, o.keep[0]), *structure.convs[o.end - 1].activation_nodes]
            seconds[option_key(o)] = sum(shares.get(name, 0.0) for name in nodes) * ratio * whole_s
        probes += 1
    reference.seconds()  # ends the reference's profile
    return seconds, profiler_cost, probes


@dataclass
class ProbedTable(LatencyTable):
    """A table whose new rows cost what they took in a probe, where one read them."""

    probed: dict[str, float] = field(default_factory=dict)

    def row_seconds(self, option: Option, structure: Structure, signature: str) -> float:
        if not option.original and option_key(option) in self.probed:
            return self.probed[option_key(option)]
        return super().row_seconds(option, structure, signature)


def use_regime(regime: str) -> None:
    """Every session of this process in ``regime`` (see the module's docstring)."""
    if regime == "off":
        return
    import onnxprune.runtime.session as sessions

    plain = sessions.session_options

    def spinning_stopped(threads=None, spinning=False, *args, **kwargs):
        options = plain(threads, True, *args, **kwargs)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    sessions.session_options = spinning_stopped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="mobilenetv2")
    p.add_argument("--batches", default="32,1")
    p.add_argument("--regime", choices=["off", "stop"], default="off")
    p.add_argument("--plans", type=int, default=12)
    p.add_argument("--measures", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    use_regime(args.regime)
    cpu = get_backend("ort-cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-probes-"))
    summary = []
    for case in args.cases.split(","):
        original = load_model(model_of(case, tmp))
        structure = analyze_model(original)
        model = normalized(original)
        options, _ = accepted(model, blocks.search_space(structure, conv_l1_norms(to_graph(model))))
        plans = random_plans(options, blocks.positions(structure, options), args.plans)
        for batch in [int(b) for b in args.batches.split(",")]:
            for repeat in range(args.repeats):
                table = build_table(model, structure, options, cpu, batch, fingerprint(original))
                probed, cost, probes = probe_rows(model, structure, options, cpu, batch, table.whole_s)
                tables = {"in situ": table, "in situ + probes": ProbedTable(**asdict(table), probed=probed)}
                print(f"{case} b{batch} run {repeat}: whole {1e3 * table.whole_s:.3f} ms, {len(probed)} new rows in "
                      f"{probes} probes, profiled run / run {cost:.2f}", flush=True)
                errors: dict[str, list[float]] = {name: [] for name in tables}
                for k, (kind, chosen) in enumerate(plans):
                    pruned, _ = apply_plan(model, Plan(**options_plan([o for o in chosen if not o.original])))
                    reads = sorted(compare([model, pruned], cpu, batch).speedups[1] for _ in range(args.measures))
                    measured = statistics.median(reads)
                    line = f"  plan {k} ({kind}): measured {measured:.3f}x ({', '.join(f'{r:.3f}' for r in reads)})"
                    for name, t in tables.items():
                        predicted = t.whole_s / t.predict(chosen, structure)
                        errors[name].append(predicted / measured - 1)
                        line += f", {name} {predicted:.3f}x ({100 * (predicted / measured - 1):+.1f}%)"
                    print(line, flush=True)
                for name, e in errors.items():
                    med, worst = statistics.median(abs(x) for x in e), max(abs(x) for x in e)
                    summary.append(f"| {case} | {batch} | {args.regime} | {repeat} | {name} | {100 * med:.1f}% | "
                                   f"{100 * worst:.1f}% | {'yes' if med <= 0.01 and worst <= 0.03 else 'no'} | "
                                   f"{cost:.2f} |")
    print(f"\n{args.plans} random plans, ort-cpu, {cpu.device}; error = predicted / measured - 1")
    print("| model | batch | regime | run | table | median abs error | worst abs error | goal | profiled / run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
