"""Command line: argument parsing only; every verb calls onnxprune.api.

Every failure the user can fix ends with one line on stderr ("onnxprune: error: ...") and exit
status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from onnxprune import __version__, api
from onnxprune.errors import OnnxPruneError

DESCRIPTION = """\
onnxprune makes exported ONNX networks shallower and faster, after export, without the training
code: it finds residual blocks and conv chains in the graph, scores them, removes or merges them,
and writes a verified ONNX file.

verbs:
  analyze   residual blocks, shortcuts, removability, cost, and the conv chain of a model
  apply     apply a plan (blocks to remove, activations to drop, convs to merge) and verify the result
  eval      top-1 accuracy on labelled data, and agreement with a reference model
  score     SLP importance of every removable residual block (1 - CKA of the features without it)
  prune     SLP or LayerMerge until a block count, MACs reduction or measured speed-up is met
  latency   measure a model's LayerMerge latency table on a backend (e.g. on the deployment device)
  bench     latency of a model, or of two side by side with their ratio
  demo      the whole pipeline on the shipped CIFAR-10 ResNet-56: 1.5x faster on ort-cpu, accuracy before/after
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxprune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser(
        "analyze", help="show the residual blocks and conv chain of a model",
        description="Find the residual blocks (join, fork, shortcut kind, removable, params, MACs) and the "
        "conv chain (kernel, stride, groups, channels, activation) of an ONNX model. With --json, print "
        "one JSON object with the keys residual_blocks, convs, links, spans, stride_breaks, barriers, "
        "macs, params, model and notes.",
    )
    p.add_argument("model", help="path of the .onnx file (external data is read from beside it)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.set_defaults(run=_analyze)

    p = verbs.add_parser(
        "apply", help="apply a plan to a model, verify the result and write it",
        description="Apply PLAN (JSON) to MODEL and write the verified result to OUT. A plan lists "
        "'remove_blocks' (join names from analyze --json), 'replace_with_shortcut' (projection blocks), "
        "'drop_activations' (activation node names, or the conv they follow) and 'merge' (lists of "
        "consecutive chain conv names; activations between them are dropped, identity residuals they "
        "cover are folded in). A plan for another model, a node that does not exist, a block that is not "
        "removable or a merge across a barrier is refused before anything is written. The result is "
        "checked with onnx.checker, run with onnxruntime and compared with the original on random inputs.",
    )
    p.add_argument("model", help="the original .onnx file (never modified)")
    p.add_argument("plan", help="the plan .json file")
    p.add_argument("-o", "--output", required=True, help="where to write the rewritten .onnx file")
    p.add_argument("--json", action="store_true", help="print one JSON object (plan summary, verification)")
    p.set_defaults(run=_apply)

    p = verbs.add_parser(
        "eval", help="top-1 accuracy, and agreement with a reference model",
        description="Run MODEL with onnxruntime over --data and report top-1 accuracy (when the data has labels) "
        "and, with --reference, the share of samples where both models' top-1 agree and the mean KL divergence "
        "KL(reference || model) of their softmax outputs.",
    )
    p.add_argument("model", help="the .onnx file to evaluate")
    add_data_arguments(p)
    p.add_argument("--reference", help="the original .onnx model to compare with")
    add_provider_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_eval)

    p = verbs.add_parser(
        "score", help="SLP importance of every removable residual block",
        description="Score every removable residual block by SLP (Pons et al., arXiv 2405.17081): 1 - CKA between "
        "the original network's features (the classifier's input) and the features with that block removed, on "
        "the calibration data, without labels. Lower = less important. Only the part of the network after each "
        "block is run per candidate, fed with that block's captured input.",
    )
    p.add_argument("model", help="the .onnx file")
    add_data_arguments(p)
    p.add_argument("--feature-tensor", help="the representation to compare (default: the input of the last "
                   "Gemm/MatMul on the way to the output)")
    add_provider_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with blocks: [{join, score, ...}]")
    p.set_defaults(run=_score)

    p = verbs.add_parser(
        "prune", help="prune a model and write the verified result and its plan",
        description="SLP (--method slp): score blocks by 1 - CKA, remove the lowest, re-score, repeat until "
        "--remove-blocks N, --macs-reduction F or --speedup X is met (--one-shot ranks once). LayerMerge "
        "(--method layermerge, with --speedup X): time every merge/prune option on --backend, score it by CKA, "
        "solve the DP for the latency budget, then measure original and pruned side by side; when the measured "
        "speed-up misses X the budget is tightened and the DP solved again (a few times); exit status 1 if X is "
        "still missed. Writes OUT and its plan (OUT with .plan.json) after verifying the result.",
    )
    p.add_argument("model", help="the original .onnx file (never modified)")
    p.add_argument("--method", choices=["slp", "layermerge"], default=None,
                   help="slp (default without --speedup) or layermerge (default with --speedup)")
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--remove-blocks", type=int, metavar="N", help="remove N blocks (slp)")
    stop.add_argument("--macs-reduction", type=float, metavar="F", help="remove blocks until this fraction of the MACs is gone (slp)")
    stop.add_argument("--speedup", type=float, metavar="X", help="prune until the model runs X times faster, as measured")
    add_backend_argument(p)
    p.add_argument("--latency-batch", type=int, default=1, help="batch size at which latency is measured (default 1)")
    p.add_argument("--latency-table", help="reuse a table from 'onnxprune latency' (e.g. measured on the target device)")
    p.add_argument("--pareto", metavar="CURVE.json", help="layermerge: also write the whole predicted trade-off curve "
                   "(latency, speed-up, summed importance for every budget), from the same DP table")
    p.add_argument("--scope", choices=["global", "local"], default="global",
                   help="layermerge importance: CKA at the features (global) or one conv after the change (local)")
    p.add_argument("--min-blocks-per-stage", type=int, default=1, metavar="K",
                   help="keep at least K blocks in every stage (blocks with the same output shape); default 1")
    p.add_argument("--one-shot", action="store_true", help="rank once instead of re-scoring after each removal")
    p.add_argument("--feature-tensor", help="the representation to compare (default: the classifier's input)")
    p.add_argument("-o", "--output", required=True, help="where to write the pruned .onnx file")
    p.add_argument("--plan", help="where to write the plan (default: OUTPUT with .plan.json)")
    add_data_arguments(p)
    add_provider_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=_prune)

    p = verbs.add_parser(
        "latency", help="measure a model's LayerMerge latency table",
        description="Time every distinct LayerMerge row of MODEL (each merged or original conv with its activation, at "
        "its real input shape and batch) and the whole model on --backend, and write the table as JSON. Rows are "
        "timed in rounds beside the whole model, each as its own work (on ort-cpu: onnxruntime's kernel times "
        "without its layout conversions, which the network pays once, not per conv). Build it on "
        "the deployment device and pass it to prune --latency-table; it records backend, device, versions, batch, "
        "dtype and threads, and is refused for another model.",
    )
    p.add_argument("model", help="the .onnx file")
    add_backend_argument(p)
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads for ort-cpu (default: all this process may use)")
    p.add_argument("--rounds", type=int, default=20,
                   help="rounds, each timing the whole model and every row once; medians are kept (default 20)")
    p.add_argument("-o", "--output", required=True, help="where to write the table (.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_latency)

    p = verbs.add_parser(
        "bench", help="latency of a model, or two side by side",
        description="Median latency of MODEL on --backend; with OTHER, both are measured taking turns in one "
        "process (A B, then B A, with onnxruntime's thread spinning off) and the speed-up of OTHER is the median "
        "over rounds of MODEL / OTHER measured within each round, so a slow spell of a shared machine hits both.",
    )
    p.add_argument("model", help="the .onnx file (the original, when comparing)")
    p.add_argument("other", nargs="?", help="a second .onnx file (the pruned one)")
    add_backend_argument(p)
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads for ort-cpu")
    p.add_argument("--rounds", type=int, default=25, help="turns each model takes (default 25)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_bench)

    p = verbs.add_parser(
        "demo", help="the whole pipeline on the shipped reference model",
        description="Prune the shipped CIFAR-10 ResNet-56 (models/resnet56.onnx) to a 1.5x measured speed-up on "
        "ort-cpu with LayerMerge, using the shipped calibration images, then report latency before and after, the "
        "measured speed-up, top-1 accuracy on the shipped 1,000 test images before and after, and where the files went.",
    )
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--speedup", type=float, default=1.5, help="target speed-up (default 1.5)")
    p.add_argument("--method", choices=["layermerge", "slp"], default="layermerge")
    p.add_argument("--latency-batch", type=int, default=32, help="batch size for latency (default 32)")
    p.add_argument("--model", help="another model than the shipped ResNet-56")
    p.add_argument("--data", help="calibration data (default: the shipped 512 CIFAR-10 training images)")
    p.add_argument("--test-data", help="labelled test data (default: the shipped 1,000 CIFAR-10 test images)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_demo)
    return parser


def print_json(result: dict) -> None:
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"], default="ort-cpu",
                   help="where latency is measured (default ort-cpu); GPU backends say why when they cannot run")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data", "calibration / evaluation data (see README: data)")
    g.add_argument("--data", help="a .npy/.npz file, a folder of images (labels from sub-folder names), a tar of "
                   "images, or 'random' (random inputs, labelled as such in every output)")
    g.add_argument("--labels", help="a .npy file of integer labels, overriding the data's own")
    g.add_argument("--samples", type=int, help="use a seeded random subset of this many samples")
    g.add_argument("--seed", type=int, default=0, help="seed of the subset and of random inputs (default 0)")
    g.add_argument("--batch", type=int, default=64, help="samples per onnxruntime run (default 64)")
    g.add_argument("--mean", type=_floats, help="per-channel mean for uint8 images, e.g. 0.485,0.456,0.406 "
                   "(default: the model's onnxprune.preprocess metadata)")
    g.add_argument("--std", type=_floats, help="per-channel std for uint8 images")
    g.add_argument("--scale", type=float, help="factor applied to uint8 pixels before mean/std (e.g. 0.00392157)")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="the model input's layout")
    g.add_argument("--size", type=_ints, help="resize images to H,W")


def add_provider_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="onnxruntime execution provider; auto takes CUDA when a session really gets it, else CPU "
                   "(the provider used is reported)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _preprocess_overrides(args: argparse.Namespace) -> dict:
    return {"mean": args.mean, "std": args.std, "scale": args.scale, "layout": args.layout, "size": args.size}


def _eval(args: argparse.Namespace) -> int:
    result = api.evaluate(args.model, args.data, reference=args.reference, samples=args.samples, seed=args.seed,
                          batch=args.batch, labels=args.labels, preprocess=_preprocess_overrides(args),
                          provider=args.provider)
    if args.json:
        print_json(result)
        return 0
    print(f"data: {result['data']}")
    print(f"onnxruntime provider: {result['provider']}")
    if "accuracy" in result:
        print(f"top-1 accuracy: {100 * result['accuracy']:.2f}% on {result['samples']} samples")
    if "agreement" in result:
        print(f"top-1 agreement with {result['reference']}: {100 * result['agreement']:.2f}%, "
              f"mean KL {result['mean_kl']:.4g}")
        if "reference_accuracy" in result:
            print(f"reference top-1 accuracy: {100 * result['reference_accuracy']:.2f}%")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from onnxprune.report.text import structure_report

    structure = api.analyze(args.model)
    if args.json:
        print_json(structure.to_dict())
    else:
        print(structure_report(structure, args.model))
    return 0


def _apply(args: argparse.Namespace) -> int:
    result = api.apply(args.model, args.plan, args.output)
    if args.json:
        result.pop("verification_text")
        print_json(result)
    else:
        summary = result["plan"]
        print(f"removed {len(summary['removed_blocks'])} blocks, replaced {len(summary['replaced_with_shortcut'])} "
              f"by their shortcut, dropped {len(summary['dropped_activations'])} activations, "
              f"merged {len(summary['merged'])} conv runs")
        print(result["verification_text"])
        print(f"wrote {result['output']}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from onnxprune.report.text import human, table

    result = api.score(args.model, args.data, feature_tensor=args.feature_tensor, samples=args.samples,
                       seed=args.seed, batch=args.batch, preprocess=_preprocess_overrides(args), provider=args.provider)
    if args.json:
        print_json(result)
        return 0
    print(f"data: {result['data']}; feature tensor {result['feature_tensor']}; provider {result['provider']}; "
          f"{result['seconds']:.1f} s")
    ranks = {b["join"]: r for r, b in enumerate(sorted(result["blocks"], key=lambda b: b["score"]), start=1)}
    rows = [[b["join"], f"{b['score']:.6f}", str(ranks[b["join"]]), human(b["macs"])] for b in result["blocks"]]
    print(table(rows, ["join", "score (1 - CKA)", "rank", "MACs"], right={1, 2, 3}))
    return 0


def _prune(args: argparse.Namespace) -> int:
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    method = args.method or ("layermerge" if args.speedup else "slp")
    result = api.prune(args.model, args.output, method=method, data=args.data, remove_blocks=args.remove_blocks,
                       macs_reduction=args.macs_reduction, min_blocks_per_stage=args.min_blocks_per_stage,
                       one_shot=args.one_shot, feature_tensor=args.feature_tensor, samples=args.samples,
                       seed=args.seed, batch=args.batch, preprocess=_preprocess_overrides(args),
                       provider=args.provider, plan_path=args.plan, progress=progress, speedup=args.speedup,
                       backend=args.backend, latency_batch=args.latency_batch, latency_table=args.latency_table,
                       scope=args.scope, pareto=args.pareto)
    text = result.pop("verification_text")
    if args.json:
        print_json(result)
    else:
        print(f"{result['method']}: removed {len(result['removed_blocks'])} blocks, MACs "
              f"{result['macs_before'] / 1e6:.2f} M -> {result['macs_after'] / 1e6:.2f} M "
              f"(-{100 * result['macs_reduction']:.1f}%), provider {result['provider']}")
        if "measured_speedup" in result:
            print(f"latency on {result['backend']['backend']} ({result['backend']['device']}), batch "
                  f"{result['latency_batch']}: {1e3 * result['original_latency_s']:.3f} ms -> "
                  f"{1e3 * result['pruned_latency_s']:.3f} ms, measured speed-up {result['measured_speedup']:.3f}x "
                  f"(target {result['target_speedup']}x)")
        print(f"data: {result['data']}")
        print(text)
        print(f"wrote {result['output']} and {result['plan']}")
    if not result["target_met"]:
        print(f"onnxprune: error: target not met: {result['message']}", file=sys.stderr)
        return 1
    return 0


def _latency(args: argparse.Namespace) -> int:
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = api.latency(args.model, args.output, args.backend, args.batch, args.threads, rounds=args.rounds,
                         progress=progress)
    if args.json:
        print_json(result)
    else:
        print(f"{result['rows']} distinct rows for {result['options']} options on {result['backend']} "
              f"({result['device']}), batch {result['batch']}: whole model {1e3 * result['whole_s']:.3f} ms, "
              f"fixed part {1e3 * result['fixed_s']:.3f} ms")
        print(f"wrote {result['output']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    result = api.bench(args.model, args.other, args.backend, args.batch, args.threads, args.rounds)
    if args.json:
        print_json(result)
        return 0
    b = result["backend"]
    print(f"{b['backend']} on {b['device']}, batch {result['batch']}")
    for m in result["models"]:
        print(f"  {m['model']}: {1e3 * m['latency_s']:.3f} ms (median)")
    if "speedup" in result:
        print(f"speed-up of {args.other} over {args.model}: {result['speedup']:.3f}x "
              f"(median of {result['rounds']} rounds)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = api.demo(args.out, args.model, args.data, args.test_data, args.speedup, args.method,
                      latency_batch=args.latency_batch, progress=progress)
    p = result["pruned"]
    if args.json:
        p.pop("verification_text", None)
        print_json(result)
        return 0 if p["target_met"] else 1
    print(f"model: {result['model']} ({p['method']}, target {p['target_speedup']}x on {p['backend']['backend']}, "
          f"batch {p['latency_batch']})")
    print(f"latency: {1e3 * p['original_latency_s']:.2f} ms -> {1e3 * p['pruned_latency_s']:.2f} ms, "
          f"measured speed-up {p['measured_speedup']:.2f}x")
    print(f"top-1 on {result['test_data']}: {100 * result['accuracy_before']:.2f}% -> "
          f"{100 * result['accuracy_after']:.2f}% (agreement with the original {100 * result['agreement']:.2f}%)")
    print(f"removed {len(p['removed_blocks'])} blocks, merged {len(p['merged'])} conv runs; "
          f"MACs -{100 * p['macs_reduction']:.1f}%")
    print(f"files: {p['output']} and {p['plan']}")
    if not p["target_met"]:
        print(f"onnxprune: error: {p['message']}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except OnnxPruneError as exc:
        if args.debug:
            raise
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader (head, less) went away: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an input we did not foresee: still one line, unless --debug
        if args.debug:
            raise
        print(f"onnxprune: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
