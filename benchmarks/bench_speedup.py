"""prune --speedup on the reference models and a ResNet-34 at 224x224 (issue 6).

    python benchmarks/bench_speedup.py --case resnet56 [--speedups 1.3,1.5] [--methods layermerge,slp]
    python benchmarks/bench_speedup.py --case mobilenetv2
    python benchmarks/bench_speedup.py --case resnet34 --latency-batch 1   (and 8)

For every method and target: the measured speed-up (original and pruned side by side on ort-cpu),
predicted against measured latency (LayerMerge), the wall time of each stage, and accuracy on the
CIFAR-10 test split (reference models) or top-1 agreement with the original (ResNet-34: see
fitted_resnet34; CIFAR-10 images resized to 224, ImageNet normalisation), without fine-tuning.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import api  # noqa: E402
from onnxprune.options import DataOptions, LatencyOptions, OutputOptions, TargetOptions  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # progress on stderr

DATA = ROOT.parent / "shared" / "data" / "cifar10"
IMAGENET = {"size": (224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "scale": 1 / 255}
NO_PREPROCESS: dict = {}


def fitted_resnet34(train: str, folder: Path, samples: int = 512, ridge: float = 1e-2) -> Path:
    """A ResNet-34 (torchvision's layout, 224x224) whose top-1 means something without downloads.

    No pretrained weights can be fetched here, and with random BatchNorm statistics the activations
    grow block after block until every image gets the same class, so top-1 agreement would be
    meaningless. So: random convolutions, BatchNorm statistics measured on ``samples`` CIFAR-10
    training images, and a 10-class head fitted to their pooled features by ridge regression.
    """
    import torch

    from tests import zoo

    torch.manual_seed(0)  # the random convolutions
    model = zoo.perturb(zoo.BUILDERS["resnet34"](num_classes=10))
    path = zoo.export(model, folder / "resnet34.onnx", "torchscript", 224)
    data = api._dataset(api.load_model(path), DataOptions(train, samples=samples, seed=1, **IMAGENET))
    x = torch.from_numpy(data.inputs["input"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over all batches
    features: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda _m, inputs, _o: features.append(inputs[0]))
    with torch.no_grad():
        model.train()
        for batch in x.split(32):
            model(batch)
        model.eval()
        features.clear()
        for batch in x.split(32):
            model(batch)
        hook.remove()
        f = torch.cat(features).double()
        f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        y = torch.nn.functional.one_hot(torch.from_numpy(data.labels), 10).double()
        w = torch.linalg.solve(f.T @ f + ridge * len(f) * torch.eye(f.shape[1], dtype=f.dtype), f.T @ y)
        model.fc.weight.copy_(w[:-1].T.float())
        model.fc.bias.copy_(w[-1].float())
        fit = (model(x[:256]).argmax(1).numpy() == data.labels[:256]).mean()
    print(f"resnet34: BatchNorm statistics and head fitted on {len(x)} training images "
          f"(top-1 on 256 of them {100 * fit:.1f}%)", file=sys.stderr, flush=True)
    return zoo.export(model, folder / "resnet34.onnx", "torchscript", 224)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["resnet56", "mobilenetv2", "resnet34"], required=True)
    p.add_argument("--speedups", default="1.3,1.5")
    p.add_argument("--methods", default="layermerge,slp")
    p.add_argument("--latency-batch", type=int, default=None, help="default 32 (CIFAR models), 1 (ResNet-34)")
    p.add_argument("--test", default=str(DATA / "test.tar.gz"))
    p.add_argument("--train", default=str(DATA / "train.tar.gz"), help="ResNet-34's calibration images")
    p.add_argument("--test-samples", type=int, default=None, help="default: all 10,000 (CIFAR), 1,000 (ResNet-34)")
    p.add_argument("--slp-min-blocks", type=int, default=1, help="SLP's --min-blocks-per-stage (default 1)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-speedup-"))
    if args.case == "resnet34":
        model = str(fitted_resnet34(args.train, tmp))
        calib, calib_samples, preprocess = args.train, 256, IMAGENET
        latency_batch, test_samples, batch = args.latency_batch or 1, args.test_samples or 1000, 16
    else:
        model = str(ROOT / "models" / f"{args.case}.onnx")
        calib, calib_samples, preprocess = str(ROOT / "models" / "cifar10_calib512.npz"), None, NO_PREPROCESS
        latency_batch, test_samples, batch = args.latency_batch or 32, args.test_samples, 64
    rows = []
    for method in args.methods.split(","):
        for target in (float(x) for x in args.speedups.split(",")):
            out = tmp / f"{args.case}_{method}_{target}.onnx"
            t0 = time.perf_counter()
            slp_only = {"min_blocks_per_stage": args.slp_min_blocks} if method == "slp" else {}
            r = api.prune(model, TargetOptions(method=method, speedup=target, **slp_only), OutputOptions(str(out)),
                          DataOptions(calib, samples=calib_samples, batch=batch, **preprocess),
                          latency=LatencyOptions(batch=latency_batch)).to_dict()
            wall = time.perf_counter() - t0
            e = api.evaluate(out, DataOptions(args.test, samples=test_samples, batch=batch, **preprocess),
                             reference=model).to_dict()
            quality = f"{100 * e['accuracy']:.2f}% (original {100 * e['reference_accuracy']:.2f}%)"
            if args.case == "resnet34":
                quality = f"{100 * e['agreement']:.2f}% agreement; top-1 {quality}"
            predicted = f"{1e3 * r['predicted_latency_s']:.2f}" if r["predicted_latency_s"] else "-"
            trail = "; ".join(f"{a['predicted_speedup']:.3f}x -> {a['speedup']:.3f}x" for a in r["attempts"])
            if trail:
                print(f"{args.case} {method} {target}x attempts (predicted -> measured): {trail}", flush=True)
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
            rows.append(f"| {args.case} | {method} | {target}x | {r['measured_speedup']:.3f}x "
                        f"{'met' if r['target_met'] else 'MISSED'} | {1e3 * r['original_latency_s']:.2f} | "
                        f"{1e3 * r['pruned_latency_s']:.2f} | {predicted} | {len(r['attempts']) or '-'} | "
                        f"{100 * r['macs_reduction']:.1f}% | {quality} | {wall:.0f} ({stages}) |")
            print(rows[-1], flush=True)
    print()
    print(f"latency batch {latency_batch}, ort-cpu; test data {e['data']}")
    print("| model | method | target | measured | original ms | pruned ms | predicted ms | attempts | MACs removed "
          "| accuracy | wall s (stages s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
