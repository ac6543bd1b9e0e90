"""Export every model of tests/zoo.py with both exporters and check the ONNX files.

For each model (cheap SMALL_KW variant) and exporter ("torchscript", "dynamo"): export, load in
onnxruntime (CPUExecutionProvider), run batch 1 and batch 3 and compare with torch's eval
output (max abs diff). Before exporting, parameters that torchvision initialises to constants
(BN statistics/affine, zero biases, the ViT head, ConvNeXt layer scale, class token) are
perturbed, so the comparison exercises every path of the graph. Also times the full-size
resnet50 / vit_b_16 exports at 224 and lists the op types of two reference graphs.

    python tools/check_zoo.py [--models a,b] [--skip-full] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import zoo  # noqa: E402

EXPORTERS = ("torchscript", "dynamo")
perturb = zoo.perturb


def graph_stats(path: Path) -> dict:
    proto = onnx.load(str(path))
    g = proto.graph
    inits = {t.name for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    ident_init = sum(1 for n in g.node if n.op_type == "Identity" and n.input and n.input[0] in inits)
    inp = g.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    external = sum(1 for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    return {"ops": dict(sorted(ops.items())), "nodes": len(g.node), "identity_from_init": ident_init,
            "input": inp.name, "input_dims": dims, "output": g.output[0].name,
            "external_initializers": external, "opset": proto.opset_import[0].version}


def compare(model: nn.Module, path: Path, size: int, batches=(1, 3), seed: int = 1) -> dict:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    res = {}
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(["logits"], {"input": x.numpy()})[0]
        assert out.shape == ref.shape, (out.shape, ref.shape)
        res[b] = (float(np.abs(out - ref).max()), float(np.abs(ref).max()))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(zoo.BUILDERS))
    ap.add_argument("--skip-full", action="store_true", help="skip the full-size resnet50/vit_b_16 exports")
    ap.add_argument("--out", default=None, help="directory for the .onnx files (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write all measurements to this JSON file")
    args = ap.parse_args()

    torch.manual_seed(0)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="check_zoo_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                    "small": {}, "full": {}, "graphs": {}}
    failures = []

    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}  out={out_dir}")
    print(f"{'model':20s} {'exporter':11s} {'export_s':>8s} {'KiB':>7s} {'nodes':>5s} {'Add':>4s} "
          f"{'diff b1':>9s} {'diff b3':>9s} {'|ref|max':>8s}")
    for name in args.models.split(","):
        size = zoo.INPUT_SIZE[name]
        model = perturb(zoo.BUILDERS[name](**zoo.SMALL_KW[name]))
        assert zoo.count_residual_blocks(model) == zoo.EXPECTED[name], name
        for ex in EXPORTERS:
            path = out_dir / f"{name}_{ex}.onnx"
            try:
                t0 = time.perf_counter()
                zoo.export(model, path, ex, size)
                dt = time.perf_counter() - t0
                st = graph_stats(path)
                diffs = compare(model, path, size)
            except Exception as e:  # keep going, report at the end
                failures.append(f"{name}/{ex}: {type(e).__name__}: {e}")
                print(f"{name:20s} {ex:11s} FAILED: {type(e).__name__}: {str(e)[:200]}")
                continue
            ok = (st["external_initializers"] == 0 and isinstance(st["input_dims"][0], str)
                  and st["input"] == "input" and st["output"] == "logits"
                  and all(d <= 1e-3 * max(1.0, r) for d, r in diffs.values()))
            if not ok:
                failures.append(f"{name}/{ex}: check failed {st['input_dims']} {diffs}")
            kib = path.stat().st_size / 1024
            print(f"{name:20s} {ex:11s} {dt:8.2f} {kib:7.0f} {st['nodes']:5d} {st['ops'].get('Add', 0):4d} "
                  f"{diffs[1][0]:9.2e} {diffs[3][0]:9.2e} {max(r for _, r in diffs.values()):8.2f}"
                  f"{'' if ok else '  <-- FAIL'}")
            report["small"][f"{name}/{ex}"] = {"export_s": dt, "bytes": path.stat().st_size,
                                               "diff_b1": diffs[1][0], "diff_b3": diffs[3][0],
                                               "ref_absmax": max(r for _, r in diffs.values()),
                                               **{k: st[k] for k in ("nodes", "opset", "identity_from_init")},
                                               "add_nodes": st["ops"].get("Add", 0)}

    # Graph structure of the default-initialised (unperturbed) small models, i.e. what tests
    # built straight from the zoo get. The TorchScript exporter deduplicates initializers with
    # equal values and re-creates the duplicates as Identity nodes fed by the kept initializer.
    print("\nDefault-init small models: Identity nodes fed by an initializer / total nodes")
    for name in args.models.split(","):
        row = []
        for ex in EXPORTERS:
            torch.manual_seed(0)
            path = out_dir / f"{name}_{ex}_default.onnx"
            try:
                zoo.export(zoo.BUILDERS[name](**zoo.SMALL_KW[name]), path, ex, zoo.INPUT_SIZE[name])
            except Exception as e:
                failures.append(f"{name}/{ex} (default init): {type(e).__name__}: {e}")
                row.append(f"{ex}: FAILED")
                continue
            st = graph_stats(path)
            report["graphs"][f"{name}/{ex}"] = st
            row.append(f"{ex}: {st['identity_from_init']:3d} / {st['nodes']:4d}")
        print(f"  {name:20s} " + "   ".join(row))
    for key in ("vit_b_16/dynamo", "resnet18/torchscript"):
        if key in report["graphs"]:
            st = report["graphs"][key]
            print(f"\n{key} (small, default init): {st['nodes']} nodes, opset {st['opset']}, "
                  f"Identity nodes fed by an initializer: {st['identity_from_init']}")
            print("  op types:", ", ".join(f"{op}x{n}" for op, n in st["ops"].items()))

    if not args.skip_full:
        print(f"\n{'full-size model':20s} {'exporter':11s} {'export_s':>8s} {'MiB':>7s} {'diff b1':>9s}")
        for name in ("resnet50", "vit_b_16"):
            model = perturb(zoo.BUILDERS[name]())
            for ex in EXPORTERS:
                path = out_dir / f"{name}_full_{ex}.onnx"
                try:
                    t0 = time.perf_counter()
                    zoo.export(model, path, ex, 224)
                    dt = time.perf_counter() - t0
                    diff = compare(model, path, 224, batches=(1,))[1][0]
                except Exception as e:
                    failures.append(f"{name}(full)/{ex}: {type(e).__name__}: {e}")
                    print(f"{name:20s} {ex:11s} FAILED: {type(e).__name__}: {str(e)[:200]}")
                    continue
                mib = path.stat().st_size / 2**20
                extra = sorted(set(os.listdir(out_dir)) - {p.name for p in out_dir.glob("*.onnx")})
                print(f"{name:20s} {ex:11s} {dt:8.1f} {mib:7.1f} {diff:9.2e}")
                report["full"][f"{name}/{ex}"] = {"export_s": dt, "bytes": path.stat().st_size,
                                                  "diff_b1": diff, "stray_files": extra}
                path.unlink()  # large; don't keep it around

    stray = sorted(set(os.listdir(out_dir)) - {p.name for p in out_dir.glob("*.onnx")})
    if stray:
        failures.append(f"stray files next to the exports: {stray}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("\n" + ("FAILURES:\n  " + "\n  ".join(failures) if failures else "all checks passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
