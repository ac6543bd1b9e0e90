"""Scale-out on Ray (issue 18; docs/scale-out.md): SLP scoring of a ResNet-34 at 224x224 in one process against Ray
tasks on 1 and 2 CPUs of this machine, Ray's overhead per task, and the efficiency the measured tasks project at 8
and 32 workers. Prints markdown tables for benchmarks/RESULTS.md.

    python benchmarks/bench_ray.py [--samples 32] [--batch 16] [--size 224] [--width-mult 1.0] [--round-trips 200]
                                   [--cpus 1,2] [--project 8,32] [--rows slp|layermerge]

(a) Scoring: ``score_blocks`` (or LayerMerge's ``score_rows`` with ``--rows layermerge``) on ``--samples`` random
    inputs, in one process (onnxruntime's default threads) and inside ``cluster.connect`` on a local Ray started with
    ``--cpus`` CPUs (one task per copy, 1 CPU and one onnxruntime thread each). Each configuration runs in its own
    process; Ray's start-up is timed apart, and each Ray configuration scores twice (the first run starts the
    workers). The scores are compared with the single process's.
(b) Overhead: the round trip of a trivial task (median over ``--round-trips``), and per copy the time from
    submitting its task to having its result, minus the task's own duration, with the copies submitted one at a time
    (``scaleout.scoring.stage`` and ``submit``) so that no task waits for a CPU.
(c) Projection: the measured task durations (from (b): one task at a time, nothing competing) scheduled longest
    first on N workers, each task paying the measured overhead: makespan, efficiency = total work / (N x makespan),
    and the projected scoring time (the driver's staging, the original's run and object-store puts, plus the
    makespan).

Healing on Ray Train (1 against 2 workers) is measured separately (not here).
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_resnet34(path: Path, size: int, width_mult: float) -> Path:
    """tests/zoo.py's ResNet-34 (10 classes, weights perturbed so no two are equal), exported by torch.onnx.export."""
    import torch

    from tests import zoo

    torch.manual_seed(0)
    model = zoo.perturb(zoo.BUILDERS["resnet34"](num_classes=10, width_mult=width_mult)).eval()
    with zoo._quiet():
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def copies_of(model, data, rows: str):
    """(original, the copies to score, a function that scores them as onnxprune does) for ``rows``."""
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.runtime.capture import feature_tensor

    structure = analyze_model(model)
    feature = feature_tensor(model)
    if rows == "layermerge":
        from onnxprune.graph.normalize import to_graph
        from onnxprune.importance.layermerge import row_copies
        from onnxprune.planning.blocks import search_space
        from onnxprune.planning.candidates import conv_l1_norms

        copies = row_copies(model, structure, search_space(structure, conv_l1_norms(to_graph(model))), feature)
        return copies.base, copies.copies
    from onnxprune.importance.slp import Copy, removal_candidates, share_weights
    from onnxprune.runtime.capture import suffix_model

    copies = []
    for block in removal_candidates(structure, 0):
        suffix, side = suffix_model(model, block.output, [feature])
        copies.append(share_weights(Copy(suffix, {block.output: block.input, **{t: t for t in side}}, feature,
                                         feature), model))
    return model, copies


def child_single(model_path: str, samples: int, batch: int, rows: str) -> dict:
    from onnxprune.data.sources import load_data
    from onnxprune.graph.io import load_model
    from onnxprune.runtime.compare import cka_with_original

    model = load_model(model_path)
    data = load_data("random", model, samples=samples)
    original, copies = copies_of(model, data, rows)
    start = time.perf_counter()
    values, _ = cka_with_original(original, copies, data, "cpu", batch)
    return {"seconds": time.perf_counter() - start, "values": values, "copies": len(copies)}


def child_ray(model_path: str, samples: int, batch: int, rows: str, cpus: int, round_trips: int) -> dict:
    import ray

    from onnxprune.data.sources import load_data
    from onnxprune.graph.io import load_model
    from onnxprune.options import RayOptions
    from onnxprune.scaleout import cluster, scoring

    model = load_model(model_path)
    data = load_data("random", model, samples=samples)
    original, copies = copies_of(model, data, rows)
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="warning")
    result = {"init_s": time.perf_counter() - start, "copies": len(copies)}
    with cluster.connect(RayOptions("auto", workers=cpus)):
        runs = [scoring.score_on_ray(original, copies, data, "cpu", batch) for _ in range(2)]
        result.update(first_s=runs[0].wall_s, warm_s=runs[1].wall_s, staging_s=runs[1].staging_s,
                      values=runs[1].values, task_s=[t.seconds for t in runs[1].tasks],
                      nodes=sorted({t.node[:8] for t in runs[1].tasks}))
        if round_trips:
            result.update(round_trip_s=round_trip(ray, round_trips), **one_at_a_time(original, copies, data, batch))
    ray.shutdown()
    return result


def round_trip(ray, count: int) -> float:
    """Median seconds of submitting a task that does nothing and getting its result."""
    @ray.remote(num_cpus=1)
    def nothing() -> None:
        return None

    for _ in range(10):
        ray.get(nothing.remote())
    times = []
    for _ in range(count):
        start = time.perf_counter()
        ray.get(nothing.remote())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_at_a_time(original, copies, data, batch: int) -> dict:
    """Every copy's task submitted alone: its own seconds, and its end-to-end seconds (submit to result) beside."""
    import ray

    from onnxprune.scaleout import scoring

    staged = scoring.stage(original, copies, data, "cpu", batch)
    inside, end_to_end = [], []
    for i, copy in enumerate(copies):
        start = time.perf_counter()
        _, _, record = ray.get(scoring.submit(staged, copy, i, "cpu", False, 0))
        end_to_end.append(time.perf_counter() - start)
        inside.append(record.seconds)
    return {"alone_task_s": inside, "alone_end_to_end_s": end_to_end, "alone_staging_s": staged.seconds}


def makespan(durations: list[float], workers: int, overhead: float) -> float:
    """Longest-first list scheduling: each task, longest first, to the worker that frees up first."""
    loads = [0.0] * workers
    for seconds in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + seconds + overhead)
    return max(loads)


def projection(durations: list[float], overhead: float, staging: float, workers: list[int]) -> list[dict]:
    total = sum(durations)
    rows = []
    for n in workers:
        span = makespan(durations, n, overhead)
        rows.append({"workers": n, "makespan_s": span, "efficiency": total / (n * span), "projected_s": staging + span})
    return rows


def run_child(args: list[str]) -> dict:
    # Ray's workers import onnxprune from this checkout too, wherever the benchmark is started from
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path})
    if done.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(single: dict, on_ray: dict[int, dict], projected: list[dict], overhead: dict, options) -> str:
    import ray

    from onnxprune.latency.backends import cpu_name

    lines = [f"{cpu_name()}, {os.cpu_count()} cores, Ray {ray.__version__}, {datetime.date.today()}: ResNet-34 "
             f"(tests/zoo.py, width x{options.width_mult:g}) at {options.size}x{options.size}, {options.rows} rows: "
             f"{single['copies']} copies, {options.samples} random samples in batches of {options.batch}.", "",
             "| run | CPUs | scoring s (first) | scoring s (warm) | staging s | task median s | same scores |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
             f"| one process | {os.cpu_count()} | {single['seconds']:.2f} | | | | |"]
    for cpus, r in on_ray.items():
        same = "yes" if r["values"] == single["values"] else (
            f"max diff {max(abs(a - b) for a, b in zip(r['values'], single['values'])):.1e}")
        lines.append(f"| Ray (started in {r['init_s']:.1f} s) | {cpus} | {r['first_s']:.2f} | {r['warm_s']:.2f} | "
                     f"{r['staging_s']:.2f} | {statistics.median(r['task_s']):.3f} | {same} |")
    lines += ["", "Ray's overhead per task: round trip of a task that does nothing "
              f"{1e3 * overhead['round_trip_s']:.2f} ms (median of {options.round_trips}); a scoring task submitted alone, end to end minus its own "
              f"duration, {1e3 * overhead['per_task_s']:.1f} ms (median of {len(overhead['durations'])}; its own "
              f"duration {statistics.median(overhead['durations']):.3f} s at the median).", "",
              "| workers | makespan s | efficiency | projected scoring s (staging + makespan) |",
              "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {p['workers']} | {p['makespan_s']:.3f} | {100 * p['efficiency']:.0f}% | {p['projected_s']:.2f} |"
              for p in projected]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, model_path, samples, batch, rows = sys.argv[2:7]
        if mode == "single":
            out = child_single(model_path, int(samples), int(batch), rows)
        else:
            out = child_ray(model_path, int(samples), int(batch), rows, int(sys.argv[7]), int(sys.argv[8]))
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--width-mult", type=float, default=1.0, help="smaller for a quick check (e.g. 0.25 at --size 64)")
    p.add_argument("--rows", choices=["slp", "layermerge"], default="slp")
    p.add_argument("--cpus", default="1,2", help="Ray CPUs of each configuration")
    p.add_argument("--round-trips", type=int, default=200)
    p.add_argument("--project", default="8,32", help="worker counts to project to")
    options = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as folder:
        path = export_resnet34(Path(folder) / "resnet34.onnx", options.size, options.width_mult)
        common = [str(path), str(options.samples), str(options.batch), options.rows]
        single = run_child(["single", *common])
        cpus = [int(c) for c in options.cpus.split(",")]
        # the overhead and the tasks' own durations are measured once, in the largest configuration
        on_ray = {n: run_child(["ray", *common, str(n), str(options.round_trips if n == max(cpus) else 0)])
                  for n in cpus}
    largest = on_ray[max(cpus)]
    durations = largest["alone_task_s"]
    per_task = statistics.median(e - i for e, i in zip(largest["alone_end_to_end_s"], durations))
    overhead = {"round_trip_s": largest["round_trip_s"], "per_task_s": per_task, "durations": durations}
    projected = projection(durations, per_task, largest["alone_staging_s"],
                           [int(n) for n in options.project.split(",")])
    print(report(single, on_ray, projected, overhead, options))


if __name__ == "__main__":
    main()
