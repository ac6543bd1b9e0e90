"""LayerMerge's search space derived from the analysis (docs/algorithms.md section 4), with SLP's move in it.

DP positions are 0..D for a chain of D convs: position p sits after chain conv p - 1 (position 0
is the chain's input). A segment (s, e] holds chain convs s..e-1; the activations strictly inside
it are removed, the one at its end stays. A segment is valid when

- nothing between its convs stops a merge (no barrier, no tensor read elsewhere),
- the convs an option keeps may be merged, and only 1x1 convs follow a strided one among them (a
  conv the option drops only has to be able to become the identity: ``subset_refusal``),
- it is laminar with every identity residual span: inside it, disjoint from it, or covering it
  exactly (then the identity folds into the merged kernel's centre tap).

What may be merged, dropped, folded or removed is decided by graph/rules.py, which plan validation
and the rewrite ask too. Its options are the subsets of convs to keep: convs that cannot become the
identity (channel-changing, strided, shape-changing) always stay, the others may go. Subsets giving the same merged shape (kernel, depthwise) are
represented by the one with the largest summed L1 weight norm, as the public code does. A segment
that covers an identity block exactly also has the option "remove the block" (SLP's move), and with
repair on its twin "replace the block by a fitted map" (``FittedMap``; planning/blocks.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph import rules
from onnxprune.graph.analysis import ChainConv, Structure


@dataclass(frozen=True)
class FittedMap:
    """The affine map that stands in for a removed block (docs/algorithms.md section 4.1): the shape of one
    sample's tensor at the block's cut, its channel axis there (0: channels first, the map is a 1x1 conv; the
    last: tokens, a MatMul and an Add), and whether it folds exactly into the linear op that produces that
    tensor (then it adds no node and costs nothing)."""

    shape: tuple[int, ...]
    axis: int
    folds: bool = False

    @property
    def conv(self) -> bool:
        """Whether the map is a 1x1 conv (channels first, with spatial axes) rather than a MatMul and an Add."""
        return self.axis == 0 and len(self.shape) >= 2


@dataclass(frozen=True)
class Option:
    start: int  # DP position s
    end: int  # DP position e: the segment holds chain convs s..e-1
    keep: tuple[str, ...]  # convs merged into one (or the one conv, unchanged)
    drop: tuple[str, ...]  # convs replaced by the identity
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    depthwise: bool
    groups: int = 1  # of the resulting conv: a kept conv keeps its own, a merge is dense unless all are depthwise
    fold_identity: str | None = None  # join of the block whose identity folds into the merged conv
    remove_block: str | None = None  # join of the block this option removes
    drop_activations: tuple[str, ...] = ()  # activation nodes strictly inside the segment
    keep_block: str | None = None  # join of a block off the chain that this option keeps as it is (planning/blocks.py)
    fitted_map: FittedMap | None = None  # with remove_block: the block is replaced by a fitted map (repair on)

    @property
    def original(self) -> bool:
        if self.keep_block is not None:
            return True
        return self.end - self.start == 1 and len(self.keep) == 1 and self.fold_identity is None


def conv_l1_norms(graph: gs.Graph) -> dict[str, float]:
    return {n.name: float(np.abs(np.asarray(n.inputs[1].values, np.float64)).sum())
            for n in graph.nodes if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant)}


def _identity_spans(structure: Structure) -> list[tuple[int, int, str]]:
    """(a, b, join) in DP positions for identity residual spans over the chain."""
    blocks = structure.residual_blocks
    return [(span["source"] + 1, span["target"] + 1, blocks[span["block"]].join) for span in structure.spans
            if blocks[span["block"]].shortcut == "identity"]


def valid_segment(structure: Structure, s: int, e: int) -> tuple[bool, str | None]:
    """(valid, join of the identity span the segment covers exactly, if any)."""
    return segment_refusal(structure, s, e) is None, _exact_span(structure, s, e)


def _exact_span(structure: Structure, s: int, e: int) -> str | None:
    return next((join for a, b, join in _identity_spans(structure) if (s, e) == (a, b)), None)


def segment_refusal(structure: Structure, s: int, e: int, keep: Collection[str] | None = None) -> str | None:
    """Why chain convs s..e-1 cannot become one conv, keeping the convs named in ``keep`` (all of them by
    default) and dropping the others, with the identity of a block they cover exactly folded in; or None. The
    conv, link and block predicates are graph/rules.py's."""
    return layout_refusal(structure, s, e) or subset_refusal(structure, s, e, keep)


def layout_refusal(structure: Structure, s: int, e: int) -> str | None:
    """What lies between convs s..e-1 and stops them becoming one conv, whichever of them are kept: a barrier,
    a tensor read elsewhere, a projection join, a residual span cut across, an identity that cannot fold."""
    for k in range(s, e - 1):
        if refusal := rules.link_refusal(structure.links[k]):
            return refusal
        if any(structure.residual_blocks[j].shortcut != "identity" for j in structure.links[k].joins):
            return f"a projection join lies between chain convs {k} and {k + 1}"
    for a, b, join in _identity_spans(structure):
        if not (e <= a or b <= s or (a <= s and e <= b) or (s, e) == (a, b)):
            return f"convs {s}..{e - 1} cut across the residual block {join}"
    exact = _exact_span(structure, s, e)
    if exact is not None:
        return rules.fold_refusal(structure.residual_blocks[_block_index(structure, exact)])
    return None


def subset_refusal(structure: Structure, s: int, e: int, keep: Collection[str] | None) -> str | None:
    """Why the convs of s..e-1 named in ``keep`` cannot merge into one conv (the others dropped), or None. Only
    merged convs (more than one, or one with an identity folded in) answer to the merge and stride rules: a
    dropped conv only has to be able to become the identity."""
    convs = structure.convs[s:e]
    kept = convs if keep is None else [c for c in convs if c.name in keep]
    if not kept:
        return f"convs {s}..{e - 1}: none is kept"
    for c in convs:
        if c not in kept and (refusal := rules.drop_refusal(c)):
            return f"{refusal}: it cannot become an identity"
    if len(kept) > 1 or _exact_span(structure, s, e) is not None:
        for c in kept:
            if refusal := rules.chain_merge_refusal(c):
                return refusal
        return rules.stride_refusal(kept, [c.name for c in kept])
    return None


def _block_index(structure: Structure, join: str) -> int:
    return next(b.index for b in structure.residual_blocks if b.join == join)


def enumerate_options(structure: Structure, l1: dict[str, float], max_convs: int = 4,
                      max_kernel: int = 7) -> list[Option]:
    """Every option of every valid segment of at most ``max_convs`` convs, originals first."""
    convs = structure.convs
    options: list[Option] = []
    for s, conv in enumerate(convs):  # every conv may stay as it is, whatever the rules say of merging it
        options.append(original_option(conv))
    for length in range(1, max_convs + 1):
        for s in range(0, len(convs) - length + 1):
            e = s + length
            exact = _exact_span(structure, s, e)
            if (length == 1 and exact is None) or layout_refusal(structure, s, e) is not None:
                continue
            options.extend(_segment_options(structure, s, e, exact, l1, max_kernel))
    # Removing a whole block merges nothing: it needs no barrier-free segment and no length limit.
    removable = {b.join for b in structure.residual_blocks if rules.remove_refusal(b) is None}
    for a, b, join in _identity_spans(structure):
        if join in removable and _laminar(structure, a, b):
            inner = tuple(name for c in convs[a:b - 1] for name in c.activation_nodes)
            unit = (1,) * len(convs[a].kernel)
            options.append(Option(a, b, (), tuple(c.name for c in convs[a:b]), unit, unit, False,
                                  remove_block=join, drop_activations=inner))
    return options


def original_option(conv: ChainConv) -> Option:
    """Chain conv ``conv`` kept as it is, with its activation: the option every tiling may fall back on."""
    return Option(conv.index, conv.index + 1, (conv.name,), (), tuple(conv.kernel), tuple(conv.stride),
                  conv.depthwise and conv.in_channels == conv.out_channels, conv.groups)


def _laminar(structure: Structure, s: int, e: int) -> bool:
    return all(e <= a or b <= s or (a <= s and e <= b) or (s <= a and b <= e) for a, b, _ in _identity_spans(structure))


def _segment_options(structure: Structure, s: int, e: int, exact: str | None, l1: dict[str, float],
                     max_kernel: int) -> list[Option]:
    convs = structure.convs[s:e]
    inner_acts = _inner_activations(structure, s, e, exact)
    required = [c for c in convs if rules.drop_refusal(c) is not None]
    optional = [c for c in convs if c not in required]
    best: dict[tuple, tuple[float, Option]] = {}
    for r in range(len(optional) + 1):
        for dropped in itertools.combinations(optional, r):
            kept = [c for c in convs if c not in dropped]
            if not kept:
                continue
            if subset_refusal(structure, s, e, {c.name for c in kept}) is not None:
                continue
            kernel = tuple(1 + sum(k[d] - 1 for k in (c.kernel for c in kept)) for d in range(len(kept[0].kernel)))
            if max(kernel) > max_kernel or (exact is not None and any(k % 2 == 0 for k in kernel)):
                continue
            stride = tuple(int(np.prod([c.stride[d] for c in kept])) for d in range(len(kernel)))
            # a depthwise conv with a channel multiplier merges into a dense conv (merge.conv_map)
            depthwise = all(c.depthwise and c.in_channels == c.out_channels for c in kept)
            if len(kept) == 1 and e - s == 1 and exact is None:
                key: tuple = ("original",)
            else:
                key = (kernel, stride, depthwise)
            # merge.conv_map makes grouped convs dense as soon as anything is merged or folded in
            alone = len(kept) == 1 and exact is None
            groups = kept[0].in_channels if depthwise else kept[0].groups if alone else 1
            option = Option(s, e, tuple(c.name for c in kept), tuple(c.name for c in dropped), kernel, stride,
                            depthwise, groups, fold_identity=exact, drop_activations=inner_acts)
            weight = sum(l1.get(c.name, 0.0) for c in kept)
            if key not in best or weight > best[key][0]:
                best[key] = (weight, option)
    return [option for _, option in best.values()]


def _inner_activations(structure: Structure, s: int, e: int, exact: str | None) -> tuple[str, ...]:
    """The activation nodes strictly inside segment s..e-1, all of which a merge absorbs: those on its links
    (a conv's own and one after a join on the way), and with an identity folded in, those between the last
    conv and the join."""
    names = [name for link in structure.links[s:e - 1] for name in link.activation_nodes]
    if exact is not None:
        branch = set(structure.residual_blocks[_block_index(structure, exact)].branch_nodes)
        names += [name for name in structure.convs[e - 1].activation_nodes if name in branch]
    return tuple(dict.fromkeys(names))


def options_plan(options: list[Option]) -> dict:
    """The plan entries (as Plan keyword arguments) that realise the chosen options; ``repair_blocks`` (the
    removed blocks that get a fitted map) only when an option replaces a block by one."""
    plan: dict[str, list] = {"remove_blocks": [], "drop_activations": [], "drop_convs": [], "merge": []}
    for o in options:
        if o.remove_block is not None:
            plan["remove_blocks"].append(o.remove_block)
            if o.fitted_map is not None:
                plan.setdefault("repair_blocks", []).append(o.remove_block)
            continue
        plan["drop_activations"].extend(o.drop_activations)
        plan["drop_convs"].extend(o.drop)
        if o.fold_identity is not None:
            plan["merge"].append({"convs": list(o.keep), "fold_identity": o.fold_identity})
        elif len(o.keep) > 1:
            plan["merge"].append(list(o.keep))
    return plan
