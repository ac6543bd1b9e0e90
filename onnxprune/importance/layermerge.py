"""Importance of LayerMerge rows by CKA instead of fine-tuning (ALGORITHMS.md section 4).

The public LayerMerge code fine-tunes the whole network for an epoch per row and uses
exp(delta accuracy / 100). Here a row's importance is h = log CKA(original representation,
representation with only that row's change applied), on the calibration data: 0 for an unchanged
conv, below 0 for every change. Scopes:

- ``global`` (default): at the feature tensor (the classifier's input), as SLP;
- ``local``: at the output of the first chain conv after the segment (the whole feature tensor
  when the segment ends the chain): cheaper, it runs only the changed region and one conv.

Each row runs only the part of the modified network after the segment's input, fed with that
input as captured from the original network (as SLP's suffix scoring).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from onnxprune.data.sources import Dataset
from onnxprune.graph.analysis import Structure
from onnxprune.graph.normalize import to_graph, to_model
from onnxprune.plan import Plan, apply_plan
from onnxprune.planning.candidates import Option, options_plan
from onnxprune.runtime.capture import suffix_model
from onnxprune.runtime.compare import Copy, cka_with_original

FLOOR = math.log(1e-6)  # importance of a row whose representation no longer resembles the original


@dataclass
class RowImportance:
    option: Option
    cka: float
    importance: float


def importance_of(cka_value: float) -> float:
    return max(FLOOR, math.log(cka_value)) if cka_value > 0 else FLOOR


def row_importances(model: onnx.ModelProto, structure: Structure, options: list[Option], data: Dataset,
                    feature: str, scope: str = "global", provider: str = "auto", batch: int = 64,
                    progress: Callable[[str], None] | None = None) -> tuple[list[RowImportance], str]:
    """(h for every option, the onnxruntime provider used); originals get 0 without being run."""
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be global or local, not {scope!r}")
    say = progress or (lambda _m: None)
    start_time = time.perf_counter()
    base = to_model(to_graph(model), model)  # normalized: tensor names as the analysis has them
    conv_io = {n.name: (n.input[0], n.output[0]) for n in base.graph.node if n.op_type == "Conv"}
    changed = [o for o in options if not o.original]
    copies = []
    for option in changed:
        modified, _ = apply_plan(base, Plan(**options_plan([option])))
        start = conv_io[structure.convs[option.start].name][0]
        target = feature
        if scope == "local" and option.end < len(structure.convs):
            target = conv_io[structure.convs[option.end].name][1]
        suffix, side = suffix_model(modified, start, [target])
        copies.append(Copy(suffix, {t: t for t in (start, *side)}, target, target))
    similarity, provider_used = cka_with_original(base, copies, data, provider, batch)
    values = {id(o): value for o, value in zip(changed, similarity)}
    say(f"layermerge: scored {len(copies)} rows ({scope} scope) in {time.perf_counter() - start_time:.1f} s")
    rows = [RowImportance(o, 1.0, 0.0) if o.original else
            RowImportance(o, values[id(o)], min(importance_of(values[id(o)]), -1e-9)) for o in options]
    return rows, provider_used
