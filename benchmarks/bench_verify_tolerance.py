"""How far function-preserving rewrites of the shipped models drift from the originals in float32: the
figure verify.TOLERANCE bounds (max |a - b| / max |a| per output and batch, a and b the original's and the
rewritten model's outputs).

    python benchmarks/bench_verify_tolerance.py [--models resnet56,mobilenetv2] [--batch 16] [--random-batches 8]

Rewrites, each run against its original with verify's onnxruntime sessions (CPU, graph optimizations on):
- normalize: the shipped model through normalization alone (constant and BN folding), what every plan starts
  from; the shipped exports have their BN folded already, so
- bn-folded: the shipped model with a BatchNormalization inserted after every conv (seeded random statistics,
  gamma and var in [0.5, 1.5], beta and mean N(0, 0.1)), against the same model normalized (BN folded back in);
  also against it run with onnxruntime's graph optimizations off, so that onnxruntime does not fold BN itself;
- merges: every merge the plan module judges function-preserving (``plan.preserves_function``), all at once;
- control: the weights of one conv (the second, the middle and the last) scaled by 1.001, a change verification
  must catch.
Inputs: ``--random-batches`` batches of N(0, 1) and the shipped calibration images in batches of ``--batch``.
Reported per rewrite: the largest and the smallest figure over the batches (verification sees one batch: a
control must stand above the tolerance in every batch, a rewrite below it in every batch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from onnxprune.data.sources import load_data  # noqa: E402
from onnxprune.graph import rewrite  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.graph.normalize import to_graph, to_model  # noqa: E402
from onnxprune.plan import Plan, PlanError, apply_plan, preserves_function  # noqa: E402
from onnxprune.runtime.session import create_session  # noqa: E402
from onnxprune.verify import TOLERANCE, compare_output, random_feeds  # noqa: E402


def normalized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model after onnxprune's normalization alone (what every rewrite starts from)."""
    return to_model(rewrite.finish(to_graph(model)), model)


def with_bn_after_convs(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy with a BatchNormalization (seeded random statistics) after every Conv."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        nodes.append(node)
        if node.op_type != "Conv":
            continue
        c = weights[node.input[1]].shape[0]
        params = {"scale": rng.uniform(0.5, 1.5, c), "B": rng.normal(0, 0.1, c), "mean": rng.normal(0, 0.1, c),
                  "var": rng.uniform(0.5, 1.5, c)}
        names = [f"{node.name}/bn.{k}" for k in params]
        out.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), n)
                                     for n, v in zip(names, params.values()))
        y = node.output[0]
        node.output[0] = y + "/pre_bn"
        nodes.append(helper.make_node("BatchNormalization", [node.output[0], *names], [y], name=f"{node.name}/bn",
                                      epsilon=1e-5))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    return out


def scaled_conv(model: onnx.ModelProto, position: int, factor: float = 1.001) -> onnx.ModelProto:
    """A copy with the weights of the ``position``-th Conv multiplied by ``factor``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv = [n for n in out.graph.node if n.op_type == "Conv"][position]
    weight = next(t for t in out.graph.initializer if t.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor), weight.name))
    return out


def preserving_merges(model: onnx.ModelProto) -> Plan:
    """Every pair of neighbouring chain convs whose merge the plan module accepts and judges function-preserving."""
    s = analyze_model(model)
    runs, used = [], set()
    for i in range(len(s.convs) - 1):
        run = [s.convs[i].name, s.convs[i + 1].name]
        plan = Plan(merge=[run])
        if used & set(run) or not preserves_function(plan, s):
            continue
        try:
            apply_plan(model, plan)
        except PlanError:
            continue
        runs.append(run)
        used |= set(run)
    return Plan(merge=runs)


def feeds_of(model: onnx.ModelProto, calib: str, batch: int, random_batches: int) -> dict[str, list[dict]]:
    data = load_data(calib, model)
    return {"random N(0,1)": [random_feeds(model, batch, seed) for seed in range(random_batches)],
            "calibration": [b.feeds for b in data.batches(batch)]}


def worst(reference: onnx.ModelProto, rewritten: onnx.ModelProto, batches: list[dict], optimize: bool = True) -> dict:
    """The largest and smallest per-batch scaled difference (largest over outputs), the lowest top-1 agreement."""
    a_session, b_session = create_session(reference, "cpu", optimize=optimize), create_session(rewritten, "cpu")
    scaled, agreement, identical = [], 1.0, True
    for feeds in batches:
        diffs = [compare_output(name, a, b, first=i == 0) for i, (name, a, b) in
                 enumerate(zip(a_session.output_names, a_session.run(feeds), b_session.run(feeds)))]
        scaled.append(max(d.scaled for d in diffs))
        agreement = min([agreement] + [d.top1_agreement for d in diffs if d.top1_agreement is not None])
        identical = identical and all(d.max_abs == 0 for d in diffs)
    return {"max": max(scaled), "min": min(scaled), "agreement": agreement, "identical": identical}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet56,mobilenetv2")
    p.add_argument("--calib", default=str(ROOT / "models" / "cifar10_calib512.npz"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--random-batches", type=int, default=8)
    args = p.parse_args()
    print(f"TOLERANCE = {TOLERANCE:g}")
    print("| model | rewrite | inputs | scaled difference, max over batches | min over batches | "
          "min top-1 agreement | identical |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        original = load_model(ROOT / "models" / f"{name}.onnx")
        with_bn = with_bn_after_convs(original)
        plan = preserving_merges(original)
        merged, _ = apply_plan(original, plan)
        cases = [("normalize", original, normalized(original), True),
                 ("bn-folded", with_bn, normalized(with_bn), True),
                 ("bn-folded, reference unoptimized", with_bn, normalized(with_bn), False),
                 (f"merges ({len(plan.merge)} pairs)", original, merged, True)]
        convs = sum(n.op_type == "Conv" for n in original.graph.node)
        cases += [(f"control: conv {k + 1} of {convs} weights x 1.001", original, scaled_conv(original, k), True)
                  for k in (1, convs // 2, convs - 1)]
        for inputs, batches in feeds_of(original, args.calib, args.batch, args.random_batches).items():
            for label, reference, rewritten, optimize in cases:
                if label.startswith("merges (0"):
                    continue
                r = worst(reference, rewritten, batches, optimize)
                print(f"| {name} | {label} | {inputs} ({len(batches)} x {args.batch}) | {r['max']:.2e} | "
                      f"{r['min']:.2e} | {100 * r['agreement']:.1f}% | {'yes' if r['identical'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
