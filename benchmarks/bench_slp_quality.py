"""SLP against random and L1-norm block removal, without fine-tuning (issue 5).

    python benchmarks/bench_slp_quality.py --model models/resnet56.onnx \\
        --calib models/cifar10_calib512.npz --test ../shared/data/cifar10/test.tar.gz --ks 3,6,9 --seeds 5

Removes k blocks by SLP (iterative: remove the lowest 1 - CKA, re-score; and one-shot), by random
order (mean and spread over seeds) and by smallest L1 norm of the branch weights, every method
keeping at least one block per stage, and evaluates top-1 accuracy on the test data.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.data.sources import load_data  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # SLP's progress
from onnxprune.evaluate import evaluate_logits, logits_of  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import infer_shapes, load_model  # noqa: E402
from onnxprune.importance.baselines import l1_norms, random_order  # noqa: E402
from onnxprune.importance.slp import prune_slp, removal_candidates, score_blocks, take_in_order  # noqa: E402
from onnxprune.options import ScoringOptions, TargetOptions  # noqa: E402
from onnxprune.plan import Plan, apply_plan  # noqa: E402
from onnxprune.runtime.capture import feature_tensor  # noqa: E402
from onnxprune.runtime.session import create_session  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/resnet56.onnx")
    p.add_argument("--calib", default="models/cifar10_calib512.npz")
    p.add_argument("--test", default="../shared/data/cifar10/test.tar.gz")
    p.add_argument("--ks", default="3,6,9")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--min-blocks-per-stage", type=int, default=1)
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    model = load_model(args.model)
    calib = load_data(args.calib, model)
    t0 = time.perf_counter()
    test = load_data(args.test, model)
    print(f"test data: {test.source}, decoded in {time.perf_counter() - t0:.1f} s", flush=True)
    structure = analyze_model(model)
    feature = feature_tensor(model)

    def accuracy(joins: list[str]) -> tuple[float, float]:
        pruned = infer_shapes(apply_plan(model, Plan(remove_blocks=joins))[0])
        logits = logits_of(create_session(pruned, "cpu"), test, 500)
        macs = analyze_model(pruned).macs
        return 100 * evaluate_logits(logits, test.labels, None)["accuracy"], 100 * (1 - macs / structure.macs)

    base, _ = accuracy([])
    print(f"original: {base:.2f}% top-1, {structure.macs / 1e6:.1f} M MACs, "
          f"{sum(b.removable for b in structure.residual_blocks)} removable blocks", flush=True)
    k_max = max(ks)
    rows: dict[str, list[str]] = {}

    t0 = time.perf_counter()
    iterative = prune_slp(model, calib, feature, TargetOptions(remove_blocks=k_max,
                                                           min_blocks_per_stage=args.min_blocks_per_stage),
                          ScoringOptions(provider="cpu")).plan.remove_blocks
    print(f"SLP iterative: {time.perf_counter() - t0:.1f} s for {k_max} removals", flush=True)
    candidates = removal_candidates(structure, 0)
    one_shot_scores = score_blocks(model, calib, candidates, feature, "cpu").scores
    one_shot = take_in_order([s.join for s in sorted(one_shot_scores, key=lambda s: s.score)], structure, k_max,
                             args.min_blocks_per_stage)
    norms = l1_norms(model, candidates)
    l1 = take_in_order(sorted(norms, key=norms.get), structure, k_max, args.min_blocks_per_stage)
    for name, order in (("SLP (iterative)", iterative), ("SLP (one-shot)", one_shot), ("L1 norm (smallest)", l1)):
        cells = []
        for k in ks:
            acc, macs = accuracy(order[:k])
            cells.append(f"{acc:.2f} (-{macs:.1f}% MACs)")
        rows[name] = cells
        print(name, cells, flush=True)
    random_cells = []
    for k in ks:
        accs = [accuracy(take_in_order(random_order(candidates, seed), structure, k, args.min_blocks_per_stage))[0]
                for seed in range(args.seeds)]
        random_cells.append(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} "
                            f"(min {min(accs):.2f}, max {max(accs):.2f})")
    rows[f"random ({args.seeds} seeds, mean ± sd)"] = random_cells
    print()
    print(f"Original: {base:.2f}% top-1 on {len(test)} test images; calibration {calib.source}.")
    print()
    print("| method | " + " | ".join(f"k = {k}" for k in ks) + " |")
    print("| --- |" + " --- |" * len(ks))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("SLP iterative order:", iterative)


if __name__ == "__main__":
    main()
