"""Command line: argument parsing only. Argument groups build the option objects (onnxprune.options), every
verb calls onnxprune.api with them, and onnxprune.report formats the result's record (``to_dict()``). Nothing
heavy is imported until a verb runs, so ``--help`` is quick.

Every failure ends with one line on stderr ("onnxprune: error: ...") and an exit status that says what kind of
failure it was (``exit_status`` maps onnxprune.errors' classes to the EXIT_* codes); ``--debug``, anywhere on the
command line, shows the traceback as well. A run that worked but missed its target (a measured speed-up, a healed
model's ``--min-agreement``) writes its outputs and exits with status 4 (EXIT_TARGET_MISSED). Progress goes to
stderr through the ``onnxprune`` logger and as progress bars (onnxprune.progress; ``--quiet`` silences both);
with ``--json`` stdout carries the one JSON object alone (anything else a library prints goes to stderr). ``prune``
and ``heal`` read their options from ``--config FILE`` too (a TOML file, or a plan onnxprune wrote: its "config"
key), flags on the command line winning. Ctrl-C ends a run with status 130 (EXIT_INTERRUPTED), the files it had
written removed (onnxprune.outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

from onnxprune.config import CONFIG_VERBS, apply_config, effective_config, load_config, record_config, subparser
from onnxprune.errors import OnnxPruneError
from onnxprune.options import (DataOptions, GateTrainingOptions, HealingOptions, LatencyOptions, OutputOptions,
                               RayOptions, RepairOptions, ScoringOptions, TargetOptions)

EXIT_VERIFICATION_FAILED = 1  # also an unexpected internal error (a bug: run with --debug)
EXIT_ERROR = EXIT_VERIFICATION_FAILED
EXIT_USAGE = 2  # bad usage or bad input: argparse's errors, OnnxPruneError
EXIT_MISSING_DEPENDENCY = 3  # an optional package missing, or a backend/provider that cannot run here
EXIT_TARGET_MISSED = 4  # outputs written, target (--speedup, --min-agreement) missed
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): the run's outputs removed, as a shell reports a process killed by SIGINT
JSON_SCHEMA_VERSION = 1  # "schema_version" of every --json object

VERSION = "0.1.0"  # onnxprune.__version__ (kept here so that --version imports nothing)

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
  heal      train a pruned model back towards its original on unlabelled data (needs torch)
  train-prune  train with learned Bernoulli gates on the residual branches and prune the blocks whose gates
            close (needs torch)
  bench     latency of a model, or of two side by side with their ratio
  demo      the whole pipeline on the shipped CIFAR-10 ResNet-56: 1.5x faster on ort-cpu, healed, accuracy
            of the original, the pruned and the healed model
"""

EPILOG = """\
exit status:
  0  done
  1  verification failed: a rewritten, repaired or healed model failed verification (nothing written);
     also an unexpected internal error (run with --debug for the traceback)
  2  bad usage or bad input: a bad flag, flag combination or --config key, an unreadable or invalid model,
     bad data, a refused plan (nothing written)
  3  a missing optional dependency (torch for heal, tensorrt, onnxruntime-gpu, ray for --ray) or a backend,
     execution provider or Ray cluster that cannot be used from here
  4  target missed: outputs written, but --speedup or --min-agreement was not met
  130  interrupted (Ctrl-C): whatever the run had written is removed; the input is never touched
--debug (before or after the verb) shows the traceback of an error; --quiet (before or after the verb)
turns progress off: the bars drawn on stderr when it is a terminal, and the progress messages. Every --json
object carries "schema_version": 1 and is the only thing written to stdout.
"""


QUIET_HELP = ("no progress on stderr: neither progress bars (drawn only when stderr is a terminal) nor progress "
              "messages; warnings and errors still show")


# What the HTML report of each verb that writes one (--report) shows (onnxprune.report.html).
REPORT_SHOWS = {
    "analyze": "the residual blocks, the conv chain, op counts and depth per stage",
    "score": "every block's score (bars, and ranked), op counts and depth per stage",
    "prune": "what was removed, merged, dropped and fitted, by node name; op counts and depth per stage before and "
             "after; block scores (slp), GradNorms and the CKA matrix with its segments (sglp), the latency rows the "
             "plan changes and the predicted trade-off curve (layermerge); measured latency distributions (--speedup); "
             "agreement before pruning, after pruning and after healing, with the healing curves (--heal-data)",
    "heal": "agreement and accuracy before pruning, after pruning and after healing, the healing loss and agreement "
            "curves, and the model before (--teacher) and after",
    "bench": "each model's latency in every round (distributions) and the speed-up",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxprune", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnxprune {VERSION}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
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
                   "Gemm/MatMul on the way to the output, or the first output when none leads to it)")
    add_provider_argument(p)
    add_memory_budget_argument(p)
    add_ray_arguments(p, "each block is scored by a Ray task, with the same scores as without Ray")
    p.add_argument("--json", action="store_true", help="print one JSON object with blocks: [{join, score, ...}]")
    p.set_defaults(run=_score)

    p = verbs.add_parser(
        "prune", help="prune a model and write the verified result and its plan",
        description="SLP (--method slp): score blocks by 1 - CKA, remove the lowest, re-score, repeat until "
        "--remove-blocks N, --macs-reduction F or --speedup X is met (--one-shot ranks once). LayerMerge "
        "(--method layermerge, with --speedup X): time every merge/prune option on --backend, score it by CKA, "
        "solve the DP for the latency budget, then measure original and pruned side by side; when the measured "
        "speed-up misses X the budget is tightened and the DP solved again (a few times); exit status 4 if X is "
        "still missed. SGLP (--method sglp, with --remove-blocks N or --speedup X): split the stem and the blocks "
        "into --segments K contiguous segments of similar CKA (Fisher's optimal segmentation; K at the elbow when not "
        "given), rank the blocks by GradNorm (needs torch) and remove the least important of each segment in "
        "proportion to its size, every segment keeping a block. Writes OUT and its plan (OUT with .plan.json) after "
        "verifying the result.",
    )
    p.add_argument("model", help="the original .onnx file (never modified)")
    g = p.add_argument_group("target", "what to prune to, and how (a flag that does not apply to the method is an error)")
    g.add_argument("--method", choices=["slp", "layermerge", "sglp"], default=None,
                   help="slp (default without --speedup), layermerge (default with --speedup) or sglp")
    stop = g.add_mutually_exclusive_group(required=True)
    stop.add_argument("--remove-blocks", type=int, metavar="N", help="remove N blocks (slp, sglp)")
    stop.add_argument("--macs-reduction", type=float, metavar="F", help="remove blocks until this fraction of the MACs is gone (slp)")
    stop.add_argument("--speedup", type=float, metavar="X", help="prune until the model runs X times faster, as measured")
    g.add_argument("--min-blocks-per-stage", type=int, default=None, metavar="K",
                   help="slp: keep at least K blocks in every stage (blocks with the same output shape); default 1")
    g.add_argument("--one-shot", action="store_true", help="slp: rank once instead of re-scoring after each removal")
    g.add_argument("--segments", type=int, default=None, metavar="K",
                   help="sglp: split the stem and the residual blocks into K segments (default: the elbow of the "
                   "segmentation loss over K = 1..10)")
    add_latency_arguments(p, batch_flag="--latency-batch", table=True, rounds_default=None, rounds_flag=True)
    g = p.add_argument_group("scoring", "how changes are scored (CKA against the original)")
    g.add_argument("--scope", choices=["global", "local"], default=None,
                   help="layermerge importance: CKA at the features (global, the default) or one conv after the change (local)")
    g.add_argument("--feature-tensor", help="the representation to compare (default: the classifier's input, or the "
                   "model's first output when no Gemm/MatMul leads to it, e.g. a detector's map)")
    add_provider_argument(g)
    add_memory_budget_argument(g)
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, help="where to write the pruned .onnx file")
    g.add_argument("--plan", help="where to write the plan (default: OUTPUT with .plan.json)")
    g.add_argument("--pareto", metavar="CURVE.json", help="layermerge: also write the whole predicted trade-off curve "
                   "(latency, speed-up, summed importance for every budget), from the same DP table")
    g.add_argument("--plot", action="store_true", help="sglp: also write the CKA matrix with the segment boundaries "
                   "as a PNG (OUTPUT with .cka.png)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_arguments(p)
    g = p.add_argument_group("repair", "fit linear maps into the cuts pruning left, without training (see repair "
                             "--help)")
    g.add_argument("--repair", choices=["linear"], default=None, help="linear: at every cut an affine map fitted by "
                   "ridge least squares on the calibration data (--data); with --speedup, the speed-up is measured "
                   "again with the maps in place")
    add_repair_arguments(g, prefix="--repair-")
    g = p.add_argument_group("healing", "train the pruned model back towards the original afterwards (needs torch; "
                             "see heal --help)")
    g.add_argument("--heal-data", metavar="D", help="data to heal on (the --data forms; may be the calibration data); "
                   "without it nothing is healed")
    add_healing_arguments(g, prefix="--heal-")
    g.add_argument("--min-agreement", type=float, metavar="F", help="with --heal-data: exit with status 4 when the "
                   "healed model agrees with the original on less than this share of the held-back samples")
    add_ray_arguments(p, "importance rows and block scores are Ray tasks (the same scores as without Ray), latency "
                      "table rows are timed on Ray actors, and --heal-data heals on Ray Train workers; the side-by-side "
                      "speed-up measurements stay in this process", resource=True,
                      workers="latency actors (at most one per CPU of the cluster, or per unit of --ray-resource) and "
                      "healing workers")
    p.set_defaults(run=_prune)

    p = verbs.add_parser(
        "heal", help="train a pruned model back towards its original, without labels",
        description="Heal MODEL (a pruned model) against --teacher (its original) on --data: a trainable torch "
        "copy of MODEL's graph learns the original's feature map before global pooling (mean squared error, "
        "relative to the original's) and its logits (KL divergence at a temperature), both computed by onnxruntime "
        "on the same augmented batch (random crop, flip and mixup for images); cross-entropy is added when the data has "
        "labels, unless --label-free. AdamW with warm-up and cosine decay. A held-back share of the data "
        "measures agreement with the original before and during healing; the checkpoint closest to it (lowest KL; the "
        "unhealed model included) is kept. The trained weights are written back into MODEL's own graph (names, structure and "
        "metadata unchanged), verified, and written to OUT with its plan: MODEL's plan (MODEL with .plan.json) "
        "when there is one, with what healing did added.",
    )
    add_pruned_and_teacher_arguments(p, "healed")
    g = p.add_argument_group("healing")
    add_healing_arguments(g, prefix="--")
    add_provider_argument(g)
    p.add_argument("--min-agreement", type=float, metavar="F", help="exit with status 4 when the healed model "
                   "agrees with the original on less than this share of the held-back samples")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_arguments(p)
    add_ray_arguments(p, "healing runs on --ray-workers Ray Train workers", workers="Ray Train workers heal")
    p.set_defaults(run=_heal)

    p = verbs.add_parser(
        "train-prune", help="train with learned gates on the residual branches and prune as they close (needs torch)",
        description="Concurrent training and layer pruning (docs/algorithms.md section 5): every removable residual "
        "block of MODEL gets a gate, y = x + xi * F(x) with xi ~ Bernoulli(theta) drawn per sample; the weights "
        "(AdamW, warm-up and cosine decay) and the thetas (projected SGD, clipped into [0, 1]) learn together. The loss "
        "is cross-entropy when the data has labels (plus the distillation KL when --teacher is given), else the KL "
        "divergence of the logits at T=4 from --teacher (default: MODEL as it is). A regulariser from a Gaussian "
        "scale-mixture prior charges each open gate for its block's parameters; a block whose theta stays under "
        "--prune-threshold for --patience steps is pruned and no longer computed. Writes OUT (trained weights, pruned "
        "blocks removed, verified), its plan, OUT with .thetas.json (theta per block per evaluation) and .thetas.png "
        "(their trajectories).",
    )
    p.add_argument("model", help="the .onnx file to train and prune (never modified)")
    p.add_argument("--teacher", help="the model to distil from (default: MODEL itself, when the data has no labels)")
    p.add_argument("-o", "--output", required=True, help="where to write the pruned .onnx file")
    p.add_argument("--plan", help="where to write the plan (default: OUTPUT with .plan.json)")
    g = p.add_argument_group("gated training")
    d = GateTrainingOptions()
    stop = g.add_mutually_exclusive_group()
    stop.add_argument("--epochs", type=float, metavar="E", help="passes over the training part of the data")
    stop.add_argument("--steps", type=int, metavar="N", help=f"optimiser steps (default {d.DEFAULT_STEPS})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate of the weights (default {d.lr})")
    g.add_argument("--train-batch", type=int, default=d.batch, metavar="N",
                   help=f"samples per step (default {d.batch}; --batch is onnxruntime's)")
    g.add_argument("--theta-lr", type=float, default=d.theta_lr, help=f"projected SGD step of the thetas (default {d.theta_lr})")
    g.add_argument("--theta-init", type=float, default=d.theta_init, help=f"initial theta (default {d.theta_init})")
    g.add_argument("--block-cost", type=float, default=d.block_cost, metavar="C", help="loss (nats per sample) a "
                   f"block of the mean parameter count must save to stay (default {d.block_cost}); larger prunes more")
    g.add_argument("--prior-std", type=float, default=d.prior_std, help=f"std of the weights' Gaussian prior (default {d.prior_std})")
    g.add_argument("--prune-threshold", type=float, default=d.threshold, help=f"theta under which ... (default {d.threshold})")
    g.add_argument("--patience", type=int, default=d.patience, help=f"... for this many steps a block is pruned (default {d.patience})")
    g.add_argument("--speedup", type=float, metavar="X", help="stop pruning once the measured speed-up (against the "
                   "normalized original on --backend at --latency-batch) reaches X; exit 4 if it is never reached")
    g.add_argument("--from-scratch", action="store_true", help="re-initialise the weights (kaiming for conv/linear) first")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop and flip of images")
    g.add_argument("--holdout", type=float, default=d.holdout, help=f"share of the data held back (default {d.holdout})")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="torch device (default cpu)")
    add_provider_argument(g)
    add_latency_arguments(p, batch_flag="--latency-batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_arguments(p)
    p.set_defaults(run=_train_prune)

    p = verbs.add_parser(
        "repair", help="fit linear maps in place of what pruning removed, without training",
        description="Repair MODEL (a pruned model) against --teacher (its original) on --data, without training: "
        "wherever pruning left a node reading an earlier tensor x where the original read y (a removed block or "
        "run of blocks, a dropped conv or activation), an affine map y ~ x M + c is fitted by ridge least squares "
        "on the data's activations (sums in float64, so memory does not grow with the data), pulled towards the "
        "identity (plain removal). Each map is folded into the conv/Gemm/MatMul producing x where that is exact, "
        "else inserted as a 1x1 conv (channel-first tensors) or a MatMul and Add (channels last): it then costs "
        "latency, which bench measures. Token sequences of a model with an attention mask are fitted on the tokens "
        "the mask keeps. Writes OUT, verified, and its plan: MODEL's plan with the fitted maps added.",
    )
    add_pruned_and_teacher_arguments(p, "repaired")
    g = p.add_argument_group("repair")
    add_repair_arguments(g, prefix="--")
    add_provider_argument(g)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_arguments(p)
    p.set_defaults(run=_repair)

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
    add_latency_arguments(p, batch_flag="--batch", rounds_default=20)
    p.add_argument("--input-shape", type=_ints, metavar="C,H,W", help="for a model whose input sizes after the "
                   "batch are symbolic: the sizes to time it at (give prune the same, or data of that size)")
    p.add_argument("-o", "--output", required=True, help="where to write the table (.json)")
    g = p.add_argument_group("repair", "rows for prune --repair linear")
    g.add_argument("--repair", choices=["linear"], default=None, help="linear: also time the fitted map that may "
                   "replace each removable block (a 1x1 conv or a MatMul at the block's cut, by its shape alone: no "
                   "data needed); without them, prune --repair with this table removes blocks without maps")
    g.add_argument("--repair-no-fold", dest="repair_no_fold", action="store_true",
                   help="time every map as its own node, as prune --repair-no-fold places them")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_ray_arguments(p, "the rows are timed on --ray-workers Ray actors, each beside the whole model, and the table "
                      "records which actor timed which row", resource=True,
                      workers="latency actors (at most one per CPU of the cluster, or per unit of --ray-resource)")
    p.set_defaults(run=_latency)

    p = verbs.add_parser(
        "bench", help="latency of a model, or two side by side",
        description="Median latency of MODEL on --backend; with OTHER, both are measured taking turns in one "
        "process (A B, then B A, with onnxruntime's thread spinning off) and the speed-up of OTHER is the median "
        "over rounds of MODEL / OTHER measured within each round, so a slow spell of a shared machine hits both.",
    )
    p.add_argument("model", help="the .onnx file (the original, when comparing)")
    p.add_argument("other", nargs="?", help="a second .onnx file (the pruned one)")
    add_latency_arguments(p, batch_flag="--batch", rounds_default=25)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_bench)

    p = verbs.add_parser(
        "demo", help="the whole pipeline on the shipped reference model",
        description="Prune the shipped CIFAR-10 ResNet-56 (models/resnet56.onnx) to a 1.5x measured speed-up on "
        "ort-cpu with LayerMerge, using the shipped calibration images, repair it without training (linear maps "
        "fitted at the cuts, see repair --help; timed in the search), heal it on the same images without their "
        "labels (see heal --help), then report latency before and after, the measured speed-up, top-1 accuracy on "
        "the shipped 1,000 test images of the original, the pruned, the repaired and the healed model, and where "
        "the files went.",
    )
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--speedup", type=float, default=1.5, help="target speed-up (default 1.5)")
    p.add_argument("--method", choices=["layermerge", "slp"], default="layermerge")
    p.add_argument("--latency-batch", type=int, default=32, help="batch size for latency (default 32)")
    p.add_argument("--model", help="another model than the shipped ResNet-56")
    p.add_argument("--data", help="calibration data (default: the shipped 512 CIFAR-10 training images)")
    p.add_argument("--test-data", help="labelled test data (default: the shipped 1,000 CIFAR-10 test images)")
    p.add_argument("--no-repair", action="store_true", help="no training-free repair between pruning and healing")
    p.add_argument("--no-heal", action="store_true", help="no healing (healing needs torch)")
    p.add_argument("--heal-steps", type=int, default=None, metavar="N",
                   help="healing steps of 64 images (default 300, about 2.5 minutes on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_demo)
    for name, sub in verbs.choices.items():
        # SUPPRESS: a verb without --debug leaves the main parser's value alone
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show a traceback on errors (also accepted before the verb)")
        sub.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                         help=QUIET_HELP + " (also accepted before the verb)")
        if name in REPORT_SHOWS:
            sub.add_argument("--report", metavar="OUT.html", help="also write an HTML report of the run to OUT.html: "
                             f"{REPORT_SHOWS[name]}; with the command, versions and machine. One self-contained file "
                             "(charts inline, nothing fetched when it is viewed; docs/report.md), written only when "
                             "the run succeeds or misses its target (exit status 0 or 4)")
        if name in CONFIG_VERBS:
            sub.add_argument("--config", metavar="FILE", help="read options from FILE: a TOML file whose keys are the "
                             "long flag names without their dashes (speedup = 1.5, heal-steps = 300, data = "
                             "\"calib.npz\"; a switch is true or false), or a plan onnxprune wrote (its \"config\" "
                             "key: the run it records can be repeated). Flags given on the command line win; an "
                             "unknown key is an error")
    return parser


# Where --json objects go: main's stdout while everything else printed during the run goes to stderr.
_json_stream = None


def print_json(result: dict) -> None:
    out = _json_stream or sys.stdout
    json.dump({"schema_version": JSON_SCHEMA_VERSION, **result}, out)
    out.write("\n")


def _given_on_command_line(argv: list[str]) -> argparse.Namespace:
    """The command line parsed with every option defaulting to nothing and none required: what was really given."""
    parser = build_parser()
    for sub in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.values():
        for action in sub._actions:
            if action.option_strings:
                action.default, action.required = argparse.SUPPRESS, False
        for group in sub._mutually_exclusive_groups:
            group.required = False
    return parser.parse_args(argv)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``--config FILE`` read in (its values as defaults, flags winning). A verb that takes
    --config gets ``args.effective_config`` (what its plan records); None for the others."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not any(a.startswith("--con") for a in argv):  # --config, or an abbreviation argparse would accept
        args = parser.parse_args(argv)
    else:
        given = _given_on_command_line(argv)
        if getattr(given, "config", None) is not None:
            config = load_config(given.config, given.verb)
            apply_config(subparser(parser, given.verb), given.verb, config, given.config, set(vars(given)))
        args = parser.parse_args(argv)
    # against a fresh parser: the defaults of this one may be the file's
    args.effective_config = (effective_config(subparser(build_parser(), args.verb), args)
                             if args.verb in CONFIG_VERBS else None)
    args.argv = argv  # the exact command line (an HTML report shows it)
    _check_report_path(args)
    return args


def _check_report_path(args: argparse.Namespace) -> None:
    """Refuse, before anything runs, a --report path that is one of the run's models (input or output)."""
    report = getattr(args, "report", None)
    if report is None:
        return
    from pathlib import Path

    for flag, path in (("MODEL", "model"), ("OTHER", "other"), ("--teacher", "teacher"), ("-o", "output"),
                       ("--plan", "plan")):
        value = getattr(args, path, None)
        if isinstance(value, str) and Path(value).resolve() == Path(report).resolve():
            raise OnnxPruneError(f"--report {report} is also {flag}: the report needs a file of its own")


def add_pruned_and_teacher_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """MODEL, --teacher, -o and --plan of a verb that works on a pruned model against its original."""
    p.add_argument("model", help="the pruned .onnx file (never modified)")
    p.add_argument("--teacher", required=True, help="the original .onnx model the pruned one was made from")
    p.add_argument("-o", "--output", required=True, help=f"where to write the {what} .onnx file")
    p.add_argument("--plan", help="where to write the plan (default: OUTPUT with .plan.json)")


def add_latency_arguments(p: argparse.ArgumentParser, batch_flag: str, table: bool = False,
                          rounds_default: int | None = None, rounds_flag: bool = False) -> None:
    g = p.add_argument_group("latency", "where and how latency is measured")
    g.add_argument("--backend", choices=["ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt", "torch", "torch-cpu",
                                         "torch-cuda"], default="ort-cpu",
                   help="where latency is measured (default ort-cpu); torch: the model's torch copy in eager mode, on "
                   "CUDA when torch sees a GPU (needs the torch extra); GPU backends say why when they cannot run")
    g.add_argument(batch_flag, dest="latency_batch", type=int, default=None, metavar="N",
                   help="batch size latency is measured at (default: the model's fixed batch size, else 1)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for ort-cpu (default: all this process may use)")
    if rounds_default is not None or rounds_flag:
        default = f"default {rounds_default}" if rounds_default else "default 20 for the table, 25 side by side"
        g.add_argument("--rounds", type=int, default=rounds_default,
                       help=f"rounds, each model (or row) timed once per round; medians are kept ({default})")
    if table:
        g.add_argument("--latency-table", help="layermerge: reuse a table from 'onnxprune latency' "
                       "(e.g. measured on the target device)")


def add_repair_arguments(g: argparse._ArgumentGroup, prefix: str) -> None:
    """Repair flags: ``--ridge`` ... for repair, ``--repair-ridge`` ... for prune."""
    g.add_argument(f"{prefix}ridge", dest="repair_ridge", type=float, default=RepairOptions.ridge, metavar="R",
                   help=f"ridge term, relative to the mean variance of a map's input channels (default "
                   f"{RepairOptions.ridge:g}); larger keeps maps closer to the identity")
    g.add_argument(f"{prefix}independent", dest="repair_independent", action="store_true",
                   help="fit every map on the original's activations in one pass, instead of each on the model "
                   "repaired so far (sequential, the default)")
    g.add_argument(f"{prefix}no-fold", dest="repair_no_fold", action="store_true",
                   help="always insert maps as nodes of their own, never fold them into a neighbouring conv or MatMul")


def repair_options(args: argparse.Namespace) -> RepairOptions:
    return RepairOptions(ridge=args.repair_ridge, sequential=not args.repair_independent, fold=not args.repair_no_fold,
                         batch=args.batch)


def add_healing_arguments(g: argparse._ArgumentGroup, prefix: str) -> None:
    """Healing flags: ``--epochs`` ... for heal, ``--heal-epochs`` ... for prune."""
    d = HealingOptions()
    stop = g.add_mutually_exclusive_group()
    stop.add_argument(f"{prefix}epochs", dest="heal_epochs", type=float, metavar="E",
                      help="passes over the training part of the data")
    stop.add_argument(f"{prefix}steps", dest="heal_steps", type=int, metavar="N",
                      help=f"optimiser steps (default {HealingOptions.DEFAULT_STEPS} when neither is given)")
    g.add_argument(f"{prefix}lr", dest="heal_lr", type=float, default=d.lr, metavar="LR", help=f"AdamW peak learning rate (default {d.lr})")
    g.add_argument("--heal-batch", dest="heal_batch", type=int, default=d.batch, metavar="N",
                   help=f"samples per healing step (default {d.batch}; --batch is onnxruntime's)")
    g.add_argument(f"{prefix}holdout", dest="heal_holdout", type=float, default=d.holdout, metavar="F",
                   help=f"share of the data held back to measure agreement and pick the checkpoint closest to the original "
                   f"(lowest KL; default {d.holdout})")
    g.add_argument("--label-free", action="store_true", help="ignore the data's labels (no cross-entropy)")
    g.add_argument("--no-augment", dest="heal_augment", action="store_false",
                   help="no random crop and flip (the original's outputs are then computed once and cached)")
    mix = g.add_mutually_exclusive_group()
    mix.add_argument("--mixup", dest="heal_mixup", action="store_const", const=True, default=None,
                     help=f"blend augmented images in pairs (default: on when fewer than {d.MIXUP_BELOW:,} samples "
                     "are trained on, where each is seen many times; off on larger data sets)")
    mix.add_argument("--no-mixup", dest="heal_mixup", action="store_const", const=False,
                     help="do not blend augmented images in pairs")
    g.add_argument("--device", dest="heal_device", choices=["cpu", "cuda"], default="cpu",
                   help="torch device for healing (default cpu)")
    g.add_argument(f"{prefix}ema", dest="heal_ema", type=float, default=None, metavar="D",
                   help="evaluate and keep a moving average of the weights, decaying by D a step (e.g. 0.995), "
                   "instead of the weights themselves")
    g.add_argument(f"{prefix}match-blocks", dest="heal_match_blocks", action="store_true",
                   help="also match the output of every residual block the pruned model keeps, not only the "
                   "feature map before pooling (hints; the original then runs on every batch)")
    if prefix == "--":
        g.add_argument("--feature-tensor", help="the feature map to match (default: the input of the global "
                       "pooling before the classifier, found in each model)")


def healing_options(args: argparse.Namespace) -> HealingOptions:
    return HealingOptions(steps=args.heal_steps, epochs=args.heal_epochs, lr=args.heal_lr, batch=args.heal_batch,
                          holdout=args.heal_holdout, use_labels=not args.label_free, augment=args.heal_augment,
                          mixup=args.heal_mixup, match_blocks=args.heal_match_blocks, ema=args.heal_ema,
                          device=args.heal_device, min_agreement=args.min_agreement,
                          feature_tensor=getattr(args, "feature_tensor", None) if args.verb == "heal" else None)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data", "calibration / evaluation data (see README: data)")
    g.add_argument("--data", help="a .npy/.npz file, a folder of images (labels from sub-folder names), a tar of "
                   "images, or 'random' (random inputs, labelled as such in every output)")
    g.add_argument("--labels", help="a .npy file of integer labels, overriding the data's own")
    g.add_argument("--samples", type=int, help="use a seeded random subset of this many samples")
    g.add_argument("--seed", type=int, default=0, help="seed of the subset and of random inputs (default 0)")
    g.add_argument("--batch", type=int, default=64, help="samples per onnxruntime run (default 64; a model with a "
                   "fixed batch dimension takes its own)")
    g.add_argument("--mean", type=_floats, help="per-channel mean for uint8 images, e.g. 0.485,0.456,0.406 "
                   "(default: the model's onnxprune.preprocess metadata)")
    g.add_argument("--std", type=_floats, help="per-channel std for uint8 images")
    g.add_argument("--scale", type=float, help="factor applied to uint8 pixels before mean/std (e.g. 0.00392157)")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="the model input's layout")
    g.add_argument("--size", type=_ints, help="resize images to H,W")
    g.add_argument("--input-shape", type=_ints, metavar="C,H,W", help="for a model whose input sizes after the "
                   "batch are symbolic: the sizes to analyse, score, time and rewrite it at (default: the data's)")


def add_provider_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="onnxruntime execution provider; auto takes CUDA when a session really gets it, else CPU "
                   "(the provider used is reported)")


def add_memory_budget_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                   help="memory that capture and scoring may hold, e.g. 4G or 512M (K, M, G, T: powers of 1024; "
                   "plain bytes without a suffix); past it, copies are scored in groups and captured tensors spill to "
                   "a temporary folder. Default: 40%% of the memory available, at most 3G. Scores do not depend on it")


def add_ray_arguments(p: argparse.ArgumentParser, what: str, resource: bool = False, workers: str | None = None) -> None:
    """``--ray``, and ``--ray-resource`` where the verb times latency, ``--ray-workers`` where it has actors or
    workers (``workers``: what they are); ``what``: what the verb sends to the cluster."""
    g = p.add_argument_group("scale-out", "run on a Ray cluster (docs/scale-out.md; pip install 'onnxprune[ray]')")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help=f"run on Ray: {what}. --ray alone (auto) joins the cluster running here (RAY_ADDRESS, or the "
                   "one 'ray start' started on this machine), else starts a local Ray for this run; --ray local always "
                   "starts one; --ray HOST:6379 (or ray://HOST:10001) joins that cluster. Give it after MODEL, or as "
                   "--ray=ADDRESS")
    if resource:
        g.add_argument("--ray-resource", metavar="NAME", help="with --ray: place every latency actor on a node that "
                       "offers the custom resource NAME, one actor per unit (edge devices joined with ray start "
                       "--resources='{\"NAME\": 1}'), so that rows are timed on those devices")
    if workers:
        g.add_argument("--ray-workers", type=int, metavar="N", help=f"with --ray: how many {workers} (default "
                       f"{RayOptions.workers})")


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """RayOptions of the command line; None without --ray (then --ray-resource and --ray-workers are errors)."""
    resource, workers = getattr(args, "ray_resource", None), getattr(args, "ray_workers", None)
    if getattr(args, "ray", None) is None:
        if resource is not None or workers is not None:
            raise OnnxPruneError("--ray-resource and --ray-workers need --ray")
        return None
    return RayOptions(args.ray, resource, RayOptions.workers if workers is None else workers)


def memory_size(text: str) -> int:
    """Bytes from '4G', '512M', '1.5GiB', '4gb', '100B' or '1048576' (K, M, G, T are powers of 1024)."""
    import re

    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?", text.strip().upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or a number of bytes, got {text!r}")
    size = int(float(match.group(1)) * (1 << (10 * " KMGT".index(match.group(2) or " "))))
    if size < 1:
        raise argparse.ArgumentTypeError(f"the memory budget must be at least 1 byte, not {text!r}")
    return size


def data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(source=args.data, labels=args.labels, samples=args.samples, seed=args.seed, batch=args.batch,
                       mean=args.mean, std=args.std, scale=args.scale, layout=args.layout, size=args.size,
                       input_shape=args.input_shape)


def scoring_options(args: argparse.Namespace) -> ScoringOptions:
    return ScoringOptions(feature_tensor=getattr(args, "feature_tensor", None), provider=args.provider,
                          scope=getattr(args, "scope", None), memory_budget=getattr(args, "memory_budget", None))


def latency_options(args: argparse.Namespace) -> LatencyOptions:
    return LatencyOptions(backend=args.backend, batch=args.latency_batch, threads=args.threads,
                          rounds=getattr(args, "rounds", None), table=getattr(args, "latency_table", None))


def target_options(args: argparse.Namespace) -> TargetOptions:
    return TargetOptions(method=args.method or ("layermerge" if args.speedup else "slp"), speedup=args.speedup,
                         remove_blocks=args.remove_blocks, macs_reduction=args.macs_reduction,
                         min_blocks_per_stage=args.min_blocks_per_stage, one_shot=args.one_shot,
                         segments=getattr(args, "segments", None))


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


def _eval(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import eval_text

    result = api.evaluate(args.model, data_options(args), reference=args.reference, provider=args.provider).to_dict()
    print_json(result) if args.json else print(eval_text(result))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import structure_report

    structure = api.analyze(args.model)
    print_json(structure.to_dict()) if args.json else print(structure_report(structure, args.model))
    return _write_report(args, structure.to_dict(), 0, args.model, structure=structure.to_dict())


def _apply(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import apply_text

    result = api.apply(args.model, args.plan, args.output).to_dict()
    if args.json:
        result.pop("verification_text")
        print_json(result)
    else:
        print(apply_text(result))
    return 0


def _score(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import score_text

    result = api.score(args.model, data_options(args), scoring_options(args), ray_options(args)).to_dict()
    print_json(result) if args.json else print(score_text(result))
    return _write_report(args, result, 0, args.model)


def _prune(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import prune_text

    heal_data = None
    if args.heal_data is not None:
        heal_data = DataOptions(source=args.heal_data, seed=args.seed, mean=args.mean, std=args.std, scale=args.scale,
                                layout=args.layout, size=args.size, input_shape=args.input_shape)
    elif args.min_agreement is not None:
        raise OnnxPruneError("--min-agreement needs --heal-data: agreement is measured on its held-back part")
    if not args.repair and (args.repair_independent or args.repair_no_fold or args.repair_ridge != RepairOptions.ridge):
        raise OnnxPruneError("--repair-ridge, --repair-independent and --repair-no-fold need --repair linear")
    output = OutputOptions(args.output, args.plan, args.pareto, args.plot, curve=args.report is not None)
    result = api.prune(args.model, target_options(args), output,
                       data_options(args), scoring_options(args), latency_options(args),
                       healing_options(args) if heal_data else None, heal_data,
                       repair_options(args) if args.repair else None, ray_options(args)).to_dict()
    record_config(result["plan"], args)
    return _write_report(args, result, _report_target(result, args.json, prune_text), args.model, result.get("output"))


def _report_target(result: dict, as_json: bool, text) -> int:
    """Print ``result`` (JSON without the verification text, or ``text(result)``); the status of its target."""
    if as_json:
        result.pop("verification_text")
        print_json(result)
    else:
        print(text(result))
    return _target_status(result)


def _write_report(args: argparse.Namespace, result: dict, status: int, before: str | None, after: str | None = None,
                  structure: dict | None = None) -> int:
    """With --report, write the HTML report of a run that succeeded or missed its target (status 0 or 4): built
    from ``result`` (what --json prints), its plan and the models ``before`` and ``after``. Returns ``status``."""
    if getattr(args, "report", None) is not None and status in (0, EXIT_TARGET_MISSED):
        from onnxprune.report.html import write_report
        from onnxprune.report.run import gather

        run = gather(args.verb, result, before, after, getattr(args, "argv", None), args.effective_config, status,
                     structure)
        logging.getLogger("onnxprune").info(f"report: {write_report(args.report, run)}")
    return status


def _target_status(result: dict) -> int:
    if not result["target_met"]:
        print(f"onnxprune: error: target not met: {result['message']}", file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


def _heal(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import heal_text

    result = api.heal(args.model, args.teacher, OutputOptions(args.output, args.plan), data_options(args),
                      healing_options(args), args.provider, ray_options(args)).to_dict()
    record_config(result["plan"], args)
    return _write_report(args, result, _report_target(result, args.json, heal_text), args.teacher, result.get("output"))


def gate_training_options(args: argparse.Namespace) -> GateTrainingOptions:
    return GateTrainingOptions(steps=args.steps, epochs=args.epochs, batch=args.train_batch, lr=args.lr,
                               theta_lr=args.theta_lr, theta_init=args.theta_init, block_cost=args.block_cost,
                               prior_std=args.prior_std, threshold=args.prune_threshold, patience=args.patience,
                               augment=args.augment, holdout=args.holdout, from_scratch=args.from_scratch,
                               speedup=args.speedup, device=args.device, seed=args.seed)


def _train_prune(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import train_prune_text

    if args.speedup is None and args.latency_batch is not None:
        raise OnnxPruneError("--latency-batch needs --speedup: nothing is timed without it")
    result = api.train_prune(args.model, OutputOptions(args.output, args.plan), data_options(args),
                             gate_training_options(args), args.teacher, latency_options(args), args.provider).to_dict()
    return _report_target(result, args.json, train_prune_text)


def _repair(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import repair_text

    result = api.repair(args.model, args.teacher, OutputOptions(args.output, args.plan), data_options(args),
                        repair_options(args), args.provider).to_dict()
    if args.json:
        result.pop("verification_text")
        print_json(result)
    else:
        print(repair_text(result))
    return 0


def _latency(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import latency_text

    if args.repair_no_fold and not args.repair:
        raise OnnxPruneError("--repair-no-fold needs --repair linear")
    repair = RepairOptions(fold=not args.repair_no_fold) if args.repair else None
    result = api.latency(args.model, args.output, latency_options(args), args.input_shape, ray_options(args),
                         repair).to_dict()
    print_json(result) if args.json else print(latency_text(result))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import bench_text

    result = api.bench(args.model, args.other, latency_options(args)).to_dict()
    print_json(result) if args.json else print(bench_text(result))
    return _write_report(args, result, 0, args.model, args.other)


def _demo(args: argparse.Namespace) -> int:
    from onnxprune import api
    from onnxprune.report.text import demo_text

    healing = None if args.no_heal else api.DEMO_HEALING
    if healing is not None and args.heal_steps is not None:
        healing = dataclasses.replace(healing, steps=args.heal_steps)
    result = api.demo(args.out, args.model, args.data, args.test_data, args.speedup, args.method,
                      LatencyOptions(batch=args.latency_batch), healing=healing,
                      repair=None if args.no_repair else RepairOptions()).to_dict()
    if args.json:
        result["pruned"].pop("verification_text", None)
        result.get("healed", {}).pop("verification_text", None)
        print_json(result)
    else:
        print(demo_text(result))
    return _target_status(result["pruned"])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (it may have been replaced since)."""

    def emit(self, record: logging.LogRecord) -> None:
        from onnxprune.progress import write_line

        try:
            write_line(self.format(record))  # above a progress bar being drawn, not through it
        except Exception:
            self.handleError(record)


def _log_to_stderr(quiet: bool = False) -> None:
    """Progress messages of every module (the ``onnxprune`` logger) go to stderr, one line each, and progress bars
    are drawn there when it is a terminal (onnxprune.progress); ``quiet`` (--quiet): warnings and errors only."""
    from onnxprune.progress import set_enabled

    set_enabled(not quiet)
    logger = logging.getLogger("onnxprune")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def exit_status(exc: BaseException) -> int:
    """The exit status of an error: onnxprune.errors' classes carry theirs (OnnxPruneError: bad usage or input, 2;
    VerificationFailed: 1; MissingDependency, UnavailableBackend: 3); anything else is unexpected: 1."""
    if isinstance(exc, OnnxPruneError):
        return exc.exit_status
    return EXIT_ERROR


def _fail(exc: BaseException, debug: bool) -> int:
    """One line on stderr (after the traceback with --debug) and the error's exit status."""
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, OnnxPruneError):
        print(f"onnxprune: error: {_one_line(str(exc))}", file=sys.stderr)
    else:  # a bug or an input we did not foresee: still one line
        print(f"onnxprune: error: {type(exc).__name__}: {_one_line(str(exc))}" + ("" if debug else " (run with "
              "--debug for the traceback)"), file=sys.stderr)
    return exit_status(exc)


def _one_line(text: str) -> str:
    """A message on one line (a library's multi-line message joined), whatever it says."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    global _json_stream
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except OnnxPruneError as exc:  # a bad --config file
        return _fail(exc, "--debug" in argv)
    _log_to_stderr(quiet=args.quiet)
    # With --json, stdout carries the JSON object alone: whatever else is printed during the run (a library's
    # warnings) goes to stderr.
    quiet_stdout = contextlib.nullcontext()
    if getattr(args, "json", False):
        _json_stream, quiet_stdout = sys.stdout, contextlib.redirect_stdout(sys.stderr)
    try:
        with quiet_stdout:
            return _run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C: what the run wrote is gone already (_run), the input never touched
        if args.debug:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print("onnxprune: error: interrupted; the outputs of this run were removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _fail(exc, args.debug)
    finally:
        _json_stream = None


def _run(args: argparse.Namespace) -> int:
    """Run the verb; when it fails or is interrupted, remove the files it had written (onnxprune.outputs)."""
    from onnxprune.outputs import run_outputs

    with run_outputs():
        try:
            return args.run(args)
        except BrokenPipeError:  # the reader (head, less) went away after the outputs were written: not an error
            sys.stdout = open(os.devnull, "w")
            return 0


if __name__ == "__main__":
    sys.exit(main())
