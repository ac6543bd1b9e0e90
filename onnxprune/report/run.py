"""What an HTML report is built from (docs/report.md): the JSON-able result a verb prints, the plan file it wrote,
the models before and after, the command line and the environment, gathered into one plain dict (a "run").

This is the report's I/O edge: it reads the plan and the models; ``onnxprune.report.html`` only formats the dict.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from collections import Counter
from pathlib import Path

import onnx

# What a structure keeps for the report (Structure.to_dict(), without the per-block node lists).
_BLOCK_KEYS = ("index", "join", "shortcut", "removable", "reason", "params", "macs", "macs_share", "parent",
               "output_shape")
_CONV_KEYS = ("index", "name", "kernel", "stride", "groups", "in_channels", "out_channels", "output_shape",
              "activation", "block", "macs")


def versions() -> dict:
    """Versions of onnxprune, Python and the packages a run used (torch only when installed; not imported)."""
    found = {"onnxprune": None, "onnx": None, "onnxruntime": None, "numpy": None, "torch": None}
    for name in found:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "onnxruntime":  # the GPU build has another distribution name
                try:
                    found[name] = importlib.metadata.version("onnxruntime-gpu")
                except importlib.metadata.PackageNotFoundError:
                    pass
    found["python"] = platform.python_version()
    return {k: v for k, v in found.items() if v is not None}


def machine() -> dict:
    """Platform, processor and the CPUs this process may use."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": _cpu_name() or platform.processor() or None, "cpu_count": os.cpu_count(),
            "usable_cpus": usable}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the main graph by op type (``domain::Op`` outside the default domain), most frequent first."""
    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                     for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def trimmed_structure(structure: dict) -> dict:
    """What the report needs of ``Structure.to_dict()``."""
    return {"model": structure.get("model", {}), "macs": structure.get("macs"), "params": structure.get("params"),
            "residual_blocks": [{k: b.get(k) for k in _BLOCK_KEYS} for b in structure.get("residual_blocks", [])],
            "convs": [{k: c.get(k) for k in _CONV_KEYS} for c in structure.get("convs", [])],
            "stride_breaks": structure.get("stride_breaks", []), "notes": structure.get("notes", [])}


def model_summary(path: str | os.PathLike[str], structure: dict | None = None) -> dict:
    """Path, op counts and structure of the model file at ``path`` (``structure``: an analysis already made)."""
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.graph.io import load_model

    raw = onnx.load(str(path), load_external_data=False)
    if structure is None:
        structure = analyze_model(load_model(path)).to_dict()
    return {"path": str(path), "nodes": len(raw.graph.node), "ops": op_counts(raw),
            "structure": trimmed_structure(structure)}


def read_plan(path: str | os.PathLike[str] | None) -> dict | None:
    """The plan file a run wrote, as JSON; None when there is none."""
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def command_line(argv: list[str] | None) -> str:
    """The command as a shell would take it back."""
    words = ["onnxprune", *argv] if argv is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    return shlex.join(words)


def gather(verb: str, result: dict, before: str | None, after: str | None = None, argv: list[str] | None = None,
           config: dict | None = None, status: int = 0, structure: dict | None = None) -> dict:
    """The run a report shows: ``result`` (the verb's JSON-able result), its plan (``result["plan"]``, a path),
    summaries of the model ``before`` (``structure``: its analysis, when the verb made one) and ``after``, the
    command, the effective configuration, the exit status and the environment."""
    plan_path = result.get("plan") if isinstance(result.get("plan"), str) else None
    return {
        "verb": verb, "status": status, "result": result, "plan": read_plan(plan_path),
        "models": {"before": model_summary(before, structure) if before else None,
                   "after": model_summary(after) if after else None},
        "command": command_line(argv), "config": config, "versions": versions(), "machine": machine(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
