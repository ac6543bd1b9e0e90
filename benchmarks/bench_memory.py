"""Peak resident memory of prune's scoring stage against the number of calibration samples (memory budget issue).

    python benchmarks/bench_memory.py [--samples 64,256,1024] [--budget default|4G|...] [--method layermerge|slp]
    python benchmarks/bench_memory.py --case vit_b_16 --method slp --samples 1024 [--max-batches 3]

The model is bench_speedup.py's case "resnet34" (``fitted_resnet34``: torchvision's ResNet-34 layout at
224x224), or tests/zoo.py's ViT-B/16 at 224x224 with random weights (torchscript export); either is built
once into a cache folder, in a process of its own so torch's memory is not counted. The data: CIFAR-10
training images resized to 224 with ImageNet normalisation, as in bench_speedup.py. Every measurement
runs in a fresh process, which does what ``prune --speedup`` does up to the DP:

- layermerge: load, data, analysis, options (``search_space`` where this checkout has it, else
  ``enumerate_options``; ``--options chain`` forces the latter), ``row_copies``, ``score_rows``;
- slp: load, data, analysis, ``removal_candidates``, one ``score_blocks`` (SLP's first ranking).

The latency table, the DP, verification and the measurement are left out: they hold one or two
sessions. ``--max-batches N`` stops the scoring pass(es) after N batches (memory only: every session
exists and the per-batch memory is reached by then; the scores are then meaningless).

Reported per run: the peak resident memory of each stage (VmHWM, reset between stages through
/proc/self/clear_refs) and of the whole process (the largest stage peak; with --whole, or where the
peak cannot be reset, ru_maxrss: what /usr/bin/time -v reports), the scoring plan, the time, and the
sum of the CKA values (equal across budgets up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "onnxprune-bench-memory"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_speedup  # noqa: E402  (the DATA and IMAGENET of the speed-up benchmark)

    from onnxprune import api
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.graph.io import load_model
    from onnxprune.graph.normalize import to_graph
    from onnxprune.options import DataOptions

    stages: dict[str, dict] = {}
    clock = time.perf_counter()
    resettable = not args.whole and _reset_peak()

    def stage(name: str, last: bool = False) -> None:
        nonlocal clock
        stages[name] = {"peak_rss": _status("VmHWM"), "rss_after": _status("VmRSS"),
                        "seconds": round(time.perf_counter() - clock, 1)}
        if not last and resettable:
            _reset_peak()
        clock = time.perf_counter()

    model = load_model(args.model)
    data = api._dataset(model, DataOptions(args.train, samples=args.samples, seed=0, batch=args.batch,
                                           **bench_speedup.IMAGENET))
    feature = api._feature(model, None)
    if args.max_batches:
        _truncate(data, args.max_batches)
    stage("load model and data")
    structure = analyze_model(model)
    budget = {} if args.budget == "default" else {"memory_budget": _size(args.budget)}
    plans = _record_plans()
    if args.method == "layermerge":
        from onnxprune.importance import layermerge
        from onnxprune.planning.candidates import conv_l1_norms

        try:
            from onnxprune.planning.blocks import search_space
        except ImportError:
            search_space = None
        if args.options == "chain" or search_space is None:
            from onnxprune.planning.candidates import enumerate_options as search_space
        options = search_space(structure, conv_l1_norms(to_graph(model)))
        rows = layermerge.row_copies(model, structure, options, feature, "global")
        stage("copies")
        scored, provider = layermerge.score_rows(rows, data, "cpu", args.batch, **budget)
        values = [r.cka for r in scored if not r.option.original]
        count = len(rows.copies)
    else:
        from onnxprune.importance import slp

        blocks = slp.removal_candidates(structure, 1)
        stage("copies")
        run = slp.score_blocks(model, data, blocks, feature, "cpu", args.batch, **budget)
        values, provider, count = [1 - s.score for s in run.scores], run.provider, len(blocks)
    stage("scoring", last=True)
    # ru_maxrss is the high-water mark since the last reset: with resets, the peak is the largest stage's.
    peak = max(s["peak_rss"] for s in stages.values()) if resettable else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"samples": len(data), "method": args.method, "copies": count, "budget": args.budget,
              "plan": plans[0] if plans else None, "provider": provider, "stages": stages if resettable else {},
              "peak_rss": peak,
              "cka_sum": float(sum(values)), "cka_min": float(min(values)), "values": [float(v) for v in values]}
    print(json.dumps(result), flush=True)


def _truncate(data, count: int) -> None:
    """Every pass over ``data`` stops after ``count`` batches."""
    batches = data.batches

    def first(size):
        for k, b in enumerate(batches(size)):
            if k == count:
                return
            yield b

    data.batches = first


def _record_plans() -> list[dict]:
    """The plans scoring makes (runtime.compare.plan_scoring), as they are made; none before the memory budget."""
    from onnxprune.runtime import compare

    plans: list[dict] = []
    plan_scoring = getattr(compare, "plan_scoring", None)
    if plan_scoring is None:  # a checkout from before the memory budget
        return plans

    def recorded(*args, **kwargs):
        p = plan_scoring(*args, **kwargs)
        plans.append({"budget": p.budget, "batch": p.batch, "groups": len(p.groups), "store": p.store,
                      "store_bytes": p.store_bytes, "estimate": p.estimate})
        return p

    compare.plan_scoring = recorded
    return plans


def _size(text: str) -> int:
    from onnxprune.cli import memory_size

    return memory_size(text)


def build_model(case: str, train: str) -> Path:
    path = CACHE / f"{case}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        if case == "resnet34":
            build = f"import bench_speedup; bench_speedup.fitted_resnet34({train!r}, Path({str(CACHE)!r}))"
        else:
            build = ("import torch; from tests import zoo; torch.manual_seed(0); "
                     f"zoo.export(zoo.perturb(zoo.BUILDERS[{case!r}]()), {str(path)!r}, 'torchscript', 224)")
        paths = [str(ROOT), str(ROOT / "benchmarks")]
        code = f"import sys; sys.path[:0] = {paths!r}; from pathlib import Path; {build}"
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default="64,256,1024")
    p.add_argument("--budget", default="default", help="default, or sizes such as 4G (comma-separated: each is run)")
    p.add_argument("--method", choices=["layermerge", "slp"], default="layermerge")
    p.add_argument("--options", choices=["search", "chain"], default="search",
                   help="layermerge: prune's search space (search) or the conv chain's options alone (chain)")
    p.add_argument("--batch", type=int, default=16, help="samples per run (bench_speedup.py's resnet34 uses 16)")
    p.add_argument("--case", choices=["resnet34", "vit_b_16"], default="resnet34")
    p.add_argument("--model", help="an .onnx file (default: the case's model, built once)")
    p.add_argument("--max-batches", type=int, default=None, help="stop each scoring pass after N batches (memory only)")
    p.add_argument("--train", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"))
    p.add_argument("--whole", action="store_true", help="no peaks per stage: the process's ru_maxrss alone (what "
                   "/usr/bin/time -v reports as its maximum resident set size)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.samples = int(args.samples)
        child(args)
        return
    model = args.model or str(build_model(args.case, args.train))
    print("| samples | method | budget | plan (batch, groups, store) | load s | load GB | copies GB | scoring s "
          "| scoring GB | peak RSS GB | sum of CKA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for budget in args.budget.split(","):
        for samples in args.samples.split(","):
            command = [sys.executable, __file__, "--child", "--samples", samples, "--budget", budget, "--method",
                       args.method, "--options", args.options, "--batch", str(args.batch), "--model", model,
                       "--train", args.train] + (["--whole"] if args.whole else []) + \
                (["--max-batches", str(args.max_batches)] if args.max_batches else [])
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            s = r["stages"]
            gb = lambda key: f"{s[key]['peak_rss'] / 1e9:.2f}" if key in s else "-"  # noqa: E731
            plan = r["plan"]
            described = (f"{plan['batch']}, {plan['groups']}, {plan['store']} (budget {plan['budget'] / 1e9:.2f} GB)"
                         if plan else "before the budget")
            print(f"| {r['samples']} | {r['method']} ({r['copies']} copies) | {budget} | {described} | "
                  f"{s.get('load model and data', {}).get('seconds', '-')} | {gb('load model and data')} | "
                  f"{gb('copies')} | {s.get('scoring', {}).get('seconds', '-')} | {gb('scoring')} | "
                  f"{r['peak_rss'] / 1e9:.2f} | {r['cka_sum']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
