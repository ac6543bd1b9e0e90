"""Side-by-side timing under three onnxruntime thread regimes (issue "every real export prunes", item 7).

    python benchmarks/bench_thread_regimes.py [--case mobilenetv2] [--batches 1,32] [--plan 8] [--calls 4]
                                              [--regimes off,stop,global]

onnxprune times models on the CPU with the intra-op threads' spinning off (``runtime.session.session_options``),
so that sessions run in turns do not steal each other's cores. Without spinning, every parallel kernel waits for
a sleeping worker thread to wake. This script measures what that costs, and how stable each regime is, on one of
``bench_latency_table.py``'s seeded random plans (``--plan K``): the normalized original, the original again (the
noise floor) and the pruned model, taken in turns (A B C, then C B A, 25 rounds of 4 runs a turn), ``--calls``
times, fresh sessions each call. Regimes:

- ``off``: spinning off, one pool per session (what onnxprune does);
- ``stop``: spinning on within a run, stopped when the run returns (``session.force_spinning_stop``), one pool per
  session;
- ``global``: one spinning pool shared by every session of the process
  (``set_global_thread_pool_sizes``), as one deployed session with onnxruntime's defaults runs back to back.
  Global pools are process-wide: once set, a session asking for its own pool fails. So each regime runs in a
  child process of its own.

Prints, per regime and call, each model's median milliseconds a run and the two speed-ups (median over rounds of
the ratio within a round). benchmarks/RESULTS.md has what it found.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROUNDS, RUNS_PER_TURN = 25, 4


def plan_models(case: str, plan: int):
    """(normalized original, pruned) for ``bench_latency_table.py``'s plan ``plan`` of ``case``."""
    from bench_latency_table import accepted, model_of, random_plans
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.graph.io import load_model
    from onnxprune.graph.normalize import to_graph
    from onnxprune.plan import Plan, apply_plan
    from onnxprune.planning import blocks
    from onnxprune.planning.candidates import conv_l1_norms, options_plan
    from onnxprune.speedup import normalized

    original = load_model(model_of(case, Path(tempfile.mkdtemp())))
    structure = analyze_model(original)
    model = normalized(original)
    options, _ = accepted(model, blocks.search_space(structure, conv_l1_norms(to_graph(model))))
    _, chosen = random_plans(options, blocks.positions(structure, options), plan + 1)[plan]
    pruned, _ = apply_plan(model, Plan(**options_plan([o for o in chosen if not o.original])))
    return model, pruned


def child(regime: str, case: str, batch: int, plan: int, calls: int) -> None:
    import onnxruntime as ort

    if regime == "global":
        from onnxruntime.capi import _pybind_state
        _pybind_state.set_global_thread_pool_sizes(2, 1)
    from onnxprune.latency.measure import random_feeds

    model, pruned = plan_models(case, plan)
    feeds = random_feeds(model, batch)

    def session(m):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if regime == "global":
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = 2
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if regime == "stop" else "0")
            if regime == "stop":
                options.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def turn(s) -> float:
        times = []
        for _ in range(RUNS_PER_TURN):
            start = time.perf_counter()
            s.run(None, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for call in range(calls):
        sessions = [session(model), session(model), session(pruned)]
        for s in sessions:
            turn(s)
        times: list[list[float]] = [[], [], []]
        for r in range(ROUNDS):
            for k in (range(3) if r % 2 == 0 else reversed(range(3))):
                times[k].append(turn(sessions[k]))
        itself, speedup = (statistics.median(a / b for a, b in zip(times[0], t)) for t in times[1:])
        ms = " / ".join(f"{1e3 * statistics.median(t):.2f}" for t in times)
        print(f"| {case} | {batch} | {regime} | {call} | {ms} | {itself:.3f} | {speedup:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="mobilenetv2")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--plan", type=int, default=8)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--regimes", default="off,stop,global")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        regime, batch = args.child.split(":")
        return child(regime, args.case, int(batch), args.plan, args.calls)
    print(f"plan {args.plan}; ms a run: original / original again / pruned")
    print("| model | batch | regime | call | ms a run | itself | plan's speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        for regime in args.regimes.split(","):
            subprocess.run([sys.executable, __file__, "--case", args.case, "--plan", str(args.plan), "--calls",
                            str(args.calls), "--child", f"{regime}:{batch}"], check=True)


if __name__ == "__main__":
    main()
