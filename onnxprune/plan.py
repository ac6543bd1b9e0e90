"""Plans: what to remove, drop and merge in a model, as a JSON file that pipelines review, store
and replay. ``apply_plan`` turns (model, plan) into a new model, or refuses before anything is
written.

A plan written by hand may hold only some of the lists, with node names as ``analyze --json``
prints them:

    {"remove_blocks": ["/layers/layers.4/Add"], "drop_activations": ["/conv1/Relu"],
     "merge": [["/layer1/conv1/Conv", "/layer1/conv2/Conv"]]}

Plans that onnxprune writes also carry ``schema``, ``model.fingerprint`` (a hash of the graph's
structure: a plan made for another model, or for an older version of it, is refused), ``method``
and ``predicted``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxprune import outputs
from onnxprune.errors import OnnxPruneError
from onnxprune.graph import rewrite, rules
from onnxprune.graph.analysis import Structure, analyze_graph
from onnxprune.graph.normalize import to_graph, to_model

SCHEMA = 1
_LISTS = ("remove_blocks", "replace_with_shortcut", "drop_activations", "drop_convs", "merge")
_KNOWN_KEYS = set(_LISTS) | {"schema", "model", "method", "predicted", "notes", "healing", "repair", "config",
                              "training", "repair_blocks"}


class PlanError(OnnxPruneError):
    """The plan cannot be applied to this model; nothing was written."""


@dataclass
class Plan:
    remove_blocks: list[str] = field(default_factory=list)
    replace_with_shortcut: list[str] = field(default_factory=list)
    drop_activations: list[str] = field(default_factory=list)
    drop_convs: list[str] = field(default_factory=list)
    merge: list[list[str] | dict] = field(default_factory=list)  # run, or {"convs": run, "fold_identity": join}
    fingerprint: str | None = None
    method: str | None = None
    predicted: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    healing: dict | None = None  # what healing did after the rewrite (onnxprune.train.heal), when it ran
    repair: dict | None = None  # the maps fitted after the rewrite (onnxprune.repair.linear), when it ran
    # The removed blocks whose cuts get a fitted map (LayerMerge's "replace by a fitted map", docs/algorithms.md
    # section 4.1): None, as in plans written before it, leaves repair to map every cut.
    repair_blocks: list[str] | None = None
    # the gated training run that chose the removed blocks (train-prune: thetas per evaluation, pruning steps)
    training: dict | None = None
    # The options of the command lines that wrote the plan, by verb ({"prune": {"speedup": 1.5, ...}, "heal": ...}):
    # what `onnxprune VERB --config PLAN` reads back to repeat the run.
    config: dict | None = None

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": {"fingerprint": self.fingerprint},
            "method": self.method,
            **{name: getattr(self, name) for name in _LISTS},
            "predicted": self.predicted,
            "notes": self.notes,
            **({"repair_blocks": self.repair_blocks} if self.repair_blocks is not None else {}),
            **({"repair": self.repair} if self.repair is not None else {}),
            **({"healing": self.healing} if self.healing is not None else {}),
            **({"training": self.training} if self.training is not None else {}),
            **({"config": self.config} if self.config is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        if not isinstance(data, dict):
            raise PlanError("a plan is a JSON object")
        unknown = set(data) - _KNOWN_KEYS
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
        if data.get("schema", SCHEMA) != SCHEMA:
            raise PlanError(f"plan schema {data.get('schema')} is not supported (this onnxprune reads schema {SCHEMA})")
        plan = cls(fingerprint=(data.get("model") or {}).get("fingerprint"), method=data.get("method"),
                   predicted=data.get("predicted") or {}, notes=list(data.get("notes") or []),
                   healing=data.get("healing"), repair=data.get("repair"), config=data.get("config"),
                   training=data.get("training"))
        if plan.config is not None and not (isinstance(plan.config, dict)
                                            and all(isinstance(v, dict) for v in plan.config.values())):
            raise PlanError('plan key "config" must map verbs to their options: {"prune": {"speedup": 1.5, ...}}')
        for name in ("remove_blocks", "replace_with_shortcut", "drop_activations", "drop_convs"):
            values = data.get(name, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise PlanError(f"plan key {name!r} must be a list of node names")
            setattr(plan, name, values)
        runs = data.get("merge", [])
        if not isinstance(runs, list) or not all(_is_run(r) for r in runs):
            raise PlanError("plan key 'merge' must be a list of runs: lists of conv names, or "
                            '{"convs": [...], "fold_identity": "<join>"}')
        plan.merge = runs
        if (mapped := data.get("repair_blocks")) is not None:
            if not isinstance(mapped, list) or not all(isinstance(v, str) for v in mapped):
                raise PlanError("plan key 'repair_blocks' must be a list of joins of removed blocks")
            plan.repair_blocks = mapped
        return plan

    @property
    def empty(self) -> bool:
        return not any(getattr(self, name) for name in _LISTS)


def _is_run(run: object) -> bool:
    if isinstance(run, dict):
        return set(run) <= {"convs", "fold_identity"} and _is_run(run.get("convs")) and (
            run.get("fold_identity") is None or isinstance(run["fold_identity"], str))
    return isinstance(run, list) and bool(run) and all(isinstance(v, str) for v in run)


def run_convs(run: list[str] | dict) -> list[str]:
    return run["convs"] if isinstance(run, dict) else run


def load_plan(path: str | os.PathLike[str]) -> Plan:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"no such plan file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path} is not valid JSON: {exc}") from None
    return Plan.from_dict(data)


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    return outputs.write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")


def fingerprint(model: onnx.ModelProto) -> str:
    """A hash of the graph's structure (nodes, their names, ops and tensors; inputs with their shapes and
    element types, outputs), not its weights: the same network exported at another input size differs."""
    h = hashlib.sha256()
    for vi in model.graph.input:
        tensor = vi.type.tensor_type
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
        shape = "x".join(dims) if tensor.HasField("shape") else "unknown"
        h.update(f"in:{vi.name}:{tensor.elem_type}:{shape};".encode())
    for vi in model.graph.output:
        h.update(f"io:{vi.name};".encode())
    for node in model.graph.node:
        h.update(f"{node.name}|{node.op_type}|{','.join(node.input)}|{','.join(node.output)};".encode())
    return "sha256:" + h.hexdigest()[:32]


@dataclass(frozen=True)
class PreparedModel:
    """A model read once for many plans (LayerMerge applies one per option): its normalized graph and its structure.
    ``apply_prepared`` rewrites a copy of the graph, so the model is imported, normalized and analysed once."""

    model: onnx.ModelProto
    graph: gs.Graph
    structure: Structure


def prepare(model: onnx.ModelProto) -> PreparedModel:
    graph = to_graph(model)
    return PreparedModel(model, graph, analyze_graph(graph, model))


def apply_plan(model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, dict]:
    """The rewritten model and a summary of what changed. Raises PlanError before any change is kept."""
    _check_plan(model, plan)
    if plan.empty:
        return _unchanged(model)
    return _rewrite(to_graph(model), model, plan, None)


def apply_prepared(prepared: PreparedModel, plan: Plan) -> tuple[onnx.ModelProto, dict]:
    """``apply_plan(prepared.model, plan)``, on a copy of the prepared graph."""
    _check_plan(prepared.model, plan)
    if plan.empty:
        return _unchanged(prepared.model)
    return _rewrite(prepared.graph.copy(), prepared.model, plan, prepared.structure)


def _check_plan(model: onnx.ModelProto, plan: Plan) -> None:
    if plan.fingerprint is not None and plan.fingerprint != fingerprint(model):
        raise PlanError("the plan was made for another model (or an older version of this one): fingerprints differ")
    if stray := [join for join in plan.repair_blocks or [] if join not in plan.remove_blocks]:
        raise PlanError(f"repair_blocks names {stray}, which the plan does not remove (only a removed block is "
                        "replaced by a fitted map)")


def _unchanged(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, {"removed_blocks": [], "replaced_with_shortcut": [], "dropped_activations": [], "dropped_convs": [],
                  "merged": [], "changes_function": False}


def _rewrite(graph: gs.Graph, model: onnx.ModelProto, plan: Plan,
             structure: Structure | None) -> tuple[onnx.ModelProto, dict]:
    """Rewrite ``graph`` (normalized ``model``, owned by the caller; ``structure``: its analysis, None to analyse)."""
    if structure is None:
        structure = analyze_graph(graph, model)
    _validate(plan, structure)
    try:
        summary = _apply(graph, plan, structure)
    except rewrite.RewriteError as exc:
        raise PlanError(str(exc)) from None
    return to_model(rewrite.finish(graph), model), summary


def _validate(plan: Plan, s: Structure) -> None:
    blocks = {b.join: b for b in s.residual_blocks}
    for join in plan.remove_blocks + plan.replace_with_shortcut:
        if join not in blocks:
            raise PlanError(f"{join!r} is not the join of a residual block (see: onnxprune analyze --json)")
    removed = set(plan.remove_blocks)
    for join in plan.remove_blocks:
        b = blocks[join]
        if refusal := rules.remove_refusal(b):
            raise PlanError(refusal)
        parent = b.parent
        while parent is not None:
            if s.residual_blocks[parent].join in removed:
                raise PlanError(f"block {join} lies inside block {s.residual_blocks[parent].join}, which is removed too")
            parent = s.residual_blocks[parent].parent
    for join in plan.replace_with_shortcut:
        if blocks[join].shortcut != "projection":
            raise PlanError(f"block {join} has a {blocks[join].shortcut} shortcut, not a projection")
    conv_index = {c.name: c.index for c in s.convs}
    gone = {name for join in plan.remove_blocks + plan.replace_with_shortcut for name in blocks[join].branch_nodes}
    dropped = set(plan.drop_convs)
    for name in plan.drop_convs:
        if name not in conv_index:
            raise PlanError(f"drop_convs names {name!r}, which is not a conv of the main chain")
        if refusal := rules.drop_refusal(s.convs[conv_index[name]]):
            raise PlanError(f"{refusal}: it cannot become an identity")
        if name in gone:
            raise PlanError(f"drop_convs names {name!r}, which belongs to a block the plan removes")
    used: set[str] = set()
    spans = {s.residual_blocks[sp["block"]].join: sp for sp in s.spans}
    for entry in plan.merge:
        run = run_convs(entry)
        fold = entry.get("fold_identity") if isinstance(entry, dict) else None
        if fold is not None and fold not in spans:
            raise PlanError(f"fold_identity names {fold!r}, which is not the join of an identity block over chain convs")
        if fold is not None and (refusal := rules.fold_refusal(blocks[fold])):
            raise PlanError(f"cannot fold the identity of {fold}: {refusal}")
        for name in run:
            if name not in conv_index:
                raise PlanError(f"merge names {name!r}, which is not a conv of the main chain")
            if name in gone:
                raise PlanError(f"merge names {name!r}, which belongs to a block the plan removes")
            if name in used or name in dropped:
                raise PlanError(f"conv {name!r} appears in two merges, or is both merged and dropped")
            used.add(name)
        positions = [conv_index[n] for n in run]
        between = [c.name for c in s.convs[positions[0]:positions[-1] + 1]]
        if positions != sorted(positions) or any(n not in run and n not in dropped for n in between):
            raise PlanError(f"merge {run} is not a run of consecutive chain convs (dropped convs may lie between)")
        for link in s.links[positions[0]:positions[-1]]:
            if refusal := rules.link_refusal(link):
                raise PlanError(f"merge {run} is refused: {refusal}")
        kept = [s.convs[p] for p in positions]
        for conv in kept:
            if refusal := rules.chain_merge_refusal(conv):
                raise PlanError(f"merge {run} is refused: {refusal}")
        if refusal := rules.stride_refusal(kept, run):
            raise PlanError(f"merge {run} is refused: {refusal}")
        join = covered_join(s, entry, dropped)
        if join is not None and (refusal := rules.fold_refusal(blocks[join])):
            raise PlanError(f"merge {run} covers block {join}, whose identity cannot fold in: {refusal}")


def covered_join(s: Structure, run: list[str] | dict, dropped: set[str] = frozenset()) -> str | None:
    """The join whose identity folds into the run's merged conv: named in a ``{"convs", "fold_identity"}``
    run, else the innermost identity span whose convs are all in the run or dropped."""
    if isinstance(run, dict):
        return run.get("fold_identity")
    index = {c.name: c.index for c in s.convs}
    positions = [index[n] for n in run]
    covering = []
    for span in s.spans:
        first, last = span["source"] + 1, span["target"]
        inside = [c.name for c in s.convs[first:last + 1]]
        if first <= min(positions) and max(positions) <= last and all(n in run or n in dropped for n in inside):
            covering.append((last - first, s.residual_blocks[span["block"]].join))
    return min(covering)[1] if covering else None


def _apply(graph: gs.Graph, plan: Plan, s: Structure) -> dict:
    blocks = {b.join: b for b in s.residual_blocks}
    activations = [rewrite.activation_of(graph, name) for name in plan.drop_activations]
    for act in activations:
        rewrite.drop_activation(graph, act)
    for name in plan.drop_convs:
        rewrite.drop_conv(graph, rewrite.node_named(graph, name))
    rewrite.finish(graph)
    merged = []
    for entry in plan.merge:
        run = run_convs(entry)
        join = covered_join(s, entry, set(plan.drop_convs))
        node = rewrite.merge_run(graph, run, through_join=join)
        rewrite.finish(graph)
        merged.append({"convs": run, "into": node.name, "kernel": node.attrs["kernel_shape"],
                       "stride": node.attrs["strides"], "groups": node.attrs["group"], "identity_folded": join})
    for join in plan.remove_blocks:
        rewrite.remove_block(graph, blocks[join])
    for join in plan.replace_with_shortcut:
        rewrite.replace_with_shortcut(graph, blocks[join])
    return {
        "removed_blocks": list(plan.remove_blocks),
        "replaced_with_shortcut": list(plan.replace_with_shortcut),
        "dropped_activations": [act.kind + ":" + act.nodes[-1].name for act in activations],
        "dropped_convs": list(plan.drop_convs),
        "merged": merged,
        "changes_function": not preserves_function(plan, s),
    }


def preserves_function(plan: Plan, s: Structure | None) -> bool:
    """Whether the model ``plan`` makes computes the original's function, up to float32 rounding.

    True for an empty plan and for plans that only merge, where no merged run drops an activation
    and every conv after the first in a run is unpadded (1x1 or no pads): such a rewrite differs from
    the original only by BN folding and merged kernels. A merge of padded convs differs in a band
    along the border (the original zero-pads each intermediate map, a merged conv cannot), and
    removing or replacing blocks, dropping activations or convs change the function outright.
    ``s`` is the structure of the model the plan is for (merges are judged by it)."""
    if plan.remove_blocks or plan.replace_with_shortcut or plan.drop_activations or plan.drop_convs:
        return False
    if not plan.merge:
        return True
    index = {c.name: c.index for c in s.convs} if s is not None else {}
    for entry in plan.merge:
        positions = [index.get(name) for name in run_convs(entry)]
        if None in positions:
            return False
        if any(s.links[p].activations for p in range(min(positions), max(positions))):
            return False
        if any(any(s.convs[p].pads) for p in positions[1:]):
            return False
    return True
