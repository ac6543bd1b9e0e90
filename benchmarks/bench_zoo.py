"""Every real export through prune: LayerMerge to 1.2x and SLP --remove-blocks 2 (the zoo matrix of
tests/test_zoo_prune.py, with what each run did and cost).

    python benchmarks/bench_zoo.py [--archs resnet18,...] [--exporters torchscript,dynamo]
                                   [--batches dynamic,static] [--light | --no-light] [--rounds 10]
                                   [--samples 16] [--json OUT.json]

Rows: every architecture of tests/zoo.py (small variants ``zoo.SMALL_KW`` at ``zoo.INPUT_SIZE``, random weights,
``zoo.perturb``) x exporter (torchscript, dynamo) x batch (dynamic, fixed at 1), then the nine opset-9 model-zoo
classics that the onnx package ships (``backend/test/data/light/light_*.onnx``, upgraded on load). Each is
pruned by ``api.prune`` twice, on random data (``--samples`` samples):

- LayerMerge to a measured 1.2x on ort-cpu (latency batch: the model's fixed batch, else 1; ``--rounds`` for
  the latency table and the side-by-side measurement): the options enumerated (the ``layermerge: N options
  over ...`` log line; chain options = N - 2 x blocks off the chain), checked against
  ``planning.blocks.search_space`` on the analysed model; the options the rewrite refused (the result's
  ``notes``); measured and predicted speed-up of the returned attempt; attempts; changes; wall time;
- SLP removing 2 blocks: blocks removed, MACs removed, wall time, and the pruned model's speed-up measured
  side by side afterwards against the normalized original, as ``prune --speedup`` measures
  (``speedup.normalized``, ``latency.measure.compare``, same rounds), which ``--remove-blocks`` never times.

Failures and refusals are recorded with their one-line error. Accuracy is meaningless here (random weights,
random data): only whether the pipeline works and how fast.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnxprune import api  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.graph.analysis import analyze_model  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.graph.normalize import to_graph  # noqa: E402
from onnxprune.latency.backends import get_backend  # noqa: E402
from onnxprune.latency.measure import compare  # noqa: E402
from onnxprune.options import DataOptions, LatencyOptions, OutputOptions, TargetOptions  # noqa: E402
from onnxprune.planning import blocks  # noqa: E402
from onnxprune.planning.candidates import conv_l1_norms  # noqa: E402
from onnxprune.speedup import MEASURE_ROUNDS, normalized  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
OPTIONS_LINE = re.compile(r"layermerge: (\d+) options over (\d+) chain convs and (\d+) blocks off the chain")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, OnnxPruneError) else f"{type(exc).__name__}: {first}"


def search_space_counts(path: Path) -> dict:
    """Options of the analysed model as planning.blocks.search_space gives them (chain, off-chain)."""
    try:
        model = load_model(path)
        structure = analyze_model(model)
        options = blocks.search_space(structure, conv_l1_norms(to_graph(model)))
        off = blocks.block_options(structure)
        return {"total": len(options), "off_chain": len(off), "chain": len(options) - len(off),
                "chain_convs": len(structure.convs),
                "blocks": len(structure.residual_blocks),
                "removable": sum(b.removable for b in structure.residual_blocks)}
    except Exception as exc:  # noqa: BLE001
        return {"error": one_line(exc)}


def run_prune(path: Path, out: Path, target: TargetOptions, samples: int, rounds: int | None) -> dict:
    handler = Collect()
    logger = logging.getLogger("onnxprune")
    logger.addHandler(handler)
    latency = LatencyOptions(rounds=rounds) if target.speedup is not None else LatencyOptions()
    t0 = time.perf_counter()
    try:
        result = api.prune(str(path), target, OutputOptions(str(out)), DataOptions("random", samples=samples),
                           latency=latency).to_dict()
        status = "ok"
    except Exception as exc:  # noqa: BLE001
        result = {"error": one_line(exc)}
        if not isinstance(exc, OnnxPruneError):
            result["traceback"] = traceback.format_exc()
        status = "error"
    finally:
        logger.removeHandler(handler)
    wall = time.perf_counter() - t0
    return {"status": status, "wall_s": wall, "log": handler.lines, **result}


def layermerge_row(path: Path, tmp: Path, samples: int, rounds: int | None) -> dict:
    r = run_prune(path, tmp / "lm.onnx", TargetOptions(method="layermerge", speedup=1.2), samples, rounds)
    r["search_space"] = search_space_counts(path)
    match = next((m for m in map(OPTIONS_LINE.search, r["log"]) if m), None)
    if match:
        total, convs, off_blocks = map(int, match.groups())
        r["options"] = {"total": total, "chain_convs": convs, "off_chain_blocks": off_blocks,
                        "off_chain": 2 * off_blocks, "chain": total - 2 * off_blocks}
    if r["status"] == "ok":
        chosen = [a for a in r["attempts"] if a["speedup"] == r["measured_speedup"]
                  and a["predicted_s"] == r["predicted_latency_s"]]
        r["returned_attempt"] = chosen[0] if chosen else None
    return r


def slp_row(path: Path, tmp: Path, samples: int, rounds: int | None) -> dict:
    out = tmp / "slp.onnx"
    r = run_prune(path, out, TargetOptions(method="slp", remove_blocks=2), samples, None)
    if r["status"] == "ok":
        t0 = time.perf_counter()
        try:
            original = load_model(path)
            batch = api.latency_batch(original, LatencyOptions())
            measured = compare([normalized(original), load_model(out)], get_backend("ort-cpu"), batch,
                               rounds or MEASURE_ROUNDS)
            r["bench_speedup"] = measured.speedups[1]
            r["bench_batch"] = batch
        except Exception as exc:  # noqa: BLE001
            r["bench_error"] = one_line(exc)
        r["bench_s"] = time.perf_counter() - t0
    return r


def zoo_models(archs, exporters, batches, folder: Path):
    """(name, exporter, batch label, path or an export error) of every zoo row, exported as it comes."""
    import torch

    from tests import zoo

    for name in archs:
        for exporter in exporters:
            for batch in batches:
                path = folder / f"{name}_{exporter}_{batch}.onnx"
                torch.manual_seed(0)
                t0 = time.perf_counter()
                try:
                    zoo.export(zoo.perturb(zoo.BUILDERS[name](**zoo.SMALL_KW[name])), path, exporter,
                               zoo.INPUT_SIZE[name], static_batch=1 if batch == "static" else None)
                    error = None
                except Exception as exc:  # noqa: BLE001
                    error = one_line(exc)
                yield name, exporter, "fixed 1" if batch == "static" else "dynamic", path, error, \
                    time.perf_counter() - t0


def light_models():
    for path in sorted(LIGHT.glob("light_*.onnx")):
        yield path.stem.removeprefix("light_"), "model zoo (opset 9)", "fixed 1", path, None, 0.0


def merged_convs(merge: list) -> tuple[int, int]:
    """(merge runs, convs in them)."""
    runs = [m["convs"] if isinstance(m, dict) else m for m in merge]
    return len(runs), sum(len(r) for r in runs)


def short_reason(note: str) -> str:
    why = note.split(" left out: ", 1)[-1]
    return re.sub(r"\b\d+\b", "N", why)[:90]


def lm_cells(r: dict) -> list[str]:
    opts = r.get("options")
    ss = r["search_space"]
    if opts:
        options = f"{opts['total']} ({opts['chain']} + {opts['off_chain']})"
        if "total" in ss and (ss["total"], ss["off_chain"]) != (opts["total"], opts["off_chain"]):
            options += f" [search_space: {ss['total']} ({ss['chain']} + {ss['off_chain']})]"
    elif "total" in ss:
        options = f"({ss['total']} ({ss['chain']} + {ss['off_chain']}) by search_space)"
    else:
        options = "-"
    if r["status"] != "ok":
        return [options, "-", f"FAILED: {r['error']}", "-", "-", "-", f"{r['wall_s']:.1f}"]
    notes = [n for n in r.get("notes", []) if n.startswith("option ")]  # not the load notes (opset upgrade)
    refused = "0" if not notes else f"{len(notes)}: " + "; ".join(
        f"{n} x {why}" if n > 1 else why for why, n in collections.Counter(map(short_reason, notes)).items())
    met = "met" if r["target_met"] else "MISSED"
    a = r.get("returned_attempt")
    predicted = f"{a['predicted_speedup']:.3f}x" if a else "?"
    runs, convs = merged_convs(r["merged"])
    changes = (f"{len(r['removed_blocks'])} blocks removed, {convs} convs in {runs} merges, "
               f"{len(r['dropped_convs'])} convs dropped")
    return [options, refused, f"{r['measured_speedup']:.3f}x {met}", predicted, str(len(r["attempts"])), changes,
            f"{r['wall_s']:.1f}"]


def slp_cells(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [f"REFUSED/FAILED: {r['error']}", "-", "-", f"{r['wall_s']:.1f}"]
    speed = f"{r['bench_speedup']:.3f}x" if "bench_speedup" in r else f"bench failed: {r.get('bench_error')}"
    return [f"{len(r['removed_blocks'])} removed", f"{100 * r['macs_reduction']:.1f}%", speed, f"{r['wall_s']:.1f}"]


def main() -> None:
    from tests import zoo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(zoo.BUILDERS))
    p.add_argument("--exporters", default="torchscript,dynamo")
    p.add_argument("--batches", default="dynamic,static")
    p.add_argument("--light", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-zoo", action="store_true")
    p.add_argument("--rounds", type=int, default=10, help="latency table and side-by-side rounds (0: defaults)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--json", default=None, help="write every result (logs included) here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("onnxprune").setLevel(logging.INFO)
    rounds = args.rounds or None
    tmp = Path(tempfile.mkdtemp(prefix="bench-zoo-"))
    print(f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}",
          file=sys.stderr, flush=True)
    sources = []
    if not args.no_zoo:
        sources.append(zoo_models(args.archs.split(","), args.exporters.split(","), args.batches.split(","), tmp))
    if args.light:
        sources.append(light_models())
    results, lm_rows, slp_rows = [], [], []
    start = time.perf_counter()
    for source in sources:
        for name, exporter, batch, path, error, export_s in source:
            head = [name, exporter, batch]
            if error is not None:
                print(f"{name} {exporter} {batch}: export failed: {error}", file=sys.stderr, flush=True)
                lm_rows.append(head + ["-", "-", f"EXPORT FAILED: {error}", "-", "-", "-", "-"])
                slp_rows.append(head + [f"EXPORT FAILED: {error}", "-", "-", "-"])
                results.append({"model": head, "export_error": error})
                continue
            work = tmp / f"{name}-{exporter.split()[0]}-{batch.replace(' ', '')}"
            work.mkdir(parents=True, exist_ok=True)
            lm = layermerge_row(path, work, args.samples, rounds)
            print(f"{name} {exporter} {batch}: layermerge {lm_cells(lm)}", file=sys.stderr, flush=True)
            sl = slp_row(path, work, args.samples, rounds)
            print(f"{name} {exporter} {batch}: slp {slp_cells(sl)}", file=sys.stderr, flush=True)
            lm_rows.append(head + lm_cells(lm))
            slp_rows.append(head + slp_cells(sl))
            results.append({"model": head, "export_s": export_s, "layermerge": lm, "slp": sl})
    total = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"LayerMerge to 1.2x, ort-cpu, random data ({args.samples} samples), rounds {rounds or 'default'}")
    print("| model | exporter | batch | options (chain + off-chain) | refused by the rewrite | measured | "
          "predicted (returned attempt) | attempts | changes | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in lm_rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("SLP --remove-blocks 2, random data; speed-up measured afterwards side by side against the normalized original")
    print("| model | exporter | batch | blocks | MACs removed | speed-up (measured after) | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in slp_rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(f"total {total:.0f} s")


if __name__ == "__main__":
    main()
