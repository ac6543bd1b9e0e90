"""What a rewrite accepts: the one place that says which convs may be dropped or merged, which segments of the
chain may become one conv, and which blocks may be removed or folded (docs/algorithms.md, sections 0 and 4).

Candidate enumeration (planning/candidates.py), plan validation (plan.py) and the rewrite passes
(graph/rewrite.py) all ask these predicates, so the LayerMerge DP is never offered an option that the
rewrite then refuses. Each predicate returns None when the change is allowed, else the reason it is not,
in words that name the graph feature (a user reads them in notes and errors).

The predicates read plain data: a ``ChainConv`` or ``ConvInfo`` (anything with kernel, stride, dilation
and pads), a ``Link`` and a ``ResidualBlock`` from the analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from onnxprune.graph.analysis import ChainConv, Link, ResidualBlock


class ConvShape(Protocol):
    kernel: Sequence[int]
    stride: Sequence[int]
    dilation: Sequence[int]
    pads: Sequence[int]


def _static(shape: list | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape[1:])


def drop_refusal(conv: ChainConv) -> str | None:
    """Why ``conv`` cannot become the identity (LayerMerge's pruned conv), or None: it must keep its
    input's channels, spatial size and stride (an unpadded or dilated conv that shrinks the map cannot go)."""
    if conv.in_channels != conv.out_channels:
        return f"conv {conv.name} changes the channel count ({conv.in_channels} -> {conv.out_channels})"
    if any(s > 1 for s in conv.stride):
        return f"conv {conv.name} is strided"
    if not (_static(conv.input_shape) and _static(conv.output_shape)):
        return f"conv {conv.name} has symbolic channel or spatial sizes"
    if conv.input_shape[1:] != conv.output_shape[1:]:
        return f"conv {conv.name} changes the shape of its input ({conv.input_shape} -> {conv.output_shape})"
    return None


def merge_refusal(conv: ConvShape, name: str = "the conv") -> str | None:
    """Why a conv cannot take part in a merge (or have an identity folded into it), or None: merged
    kernels are composed for 2-D convs with explicit padding and no dilation (graph/merge.py)."""
    if len(conv.kernel) != 2:
        return f"{name} is {len(conv.kernel)}-D: only 2-D convs are merged"
    if any(d != 1 for d in conv.dilation):
        return f"{name} is dilated {list(conv.dilation)}: dilated convs are not merged"
    if -1 in conv.pads:
        return f"{name} is SAME-padded (auto_pad): its padding depends on the input size"
    return None


def chain_merge_refusal(conv: ChainConv) -> str | None:
    """``merge_refusal`` for a chain conv, which also needs static spatial sizes (the merged conv's padding is
    computed from them)."""
    refusal = merge_refusal(conv, f"conv {conv.name}")
    if refusal is None and not (_static(conv.input_shape) and _static(conv.output_shape)):
        refusal = f"conv {conv.name} has symbolic spatial sizes"
    return refusal


def stride_refusal(kept: Sequence[ConvShape], names: Sequence[str] | None = None) -> str | None:
    """Why the kept convs of a merge (in chain order) break the stride rule, or None: once a strided conv
    has been merged, every later conv must be 1x1, so the merged kernel stays small (LayerMerge)."""
    strided = None
    for k, conv in enumerate(kept):
        name = names[k] if names else f"conv {k}"
        if strided is not None and any(size != 1 for size in conv.kernel):
            return f"only 1x1 convs may follow the strided conv {strided} in a merge, not {name}"
        if any(s > 1 for s in conv.stride):
            strided = strided or name
    return None


def link_refusal(link: Link) -> str | None:
    """Why the convs on either side of ``link`` cannot be merged into one, or None: nothing but activations,
    no-ops and identity joins may lie between them, and no tensor between them may be read elsewhere."""
    if link.barrier:
        return f"a {link.barrier} lies between chain convs {link.source} and {link.source + 1}"
    return link.escape


def fold_refusal(block: ResidualBlock) -> str | None:
    """Why the identity of ``block`` cannot fold into one conv covering its branch (LayerMerge's identity at the
    centre tap), or None. The block must be removable (identity shortcut, same shape, nothing read outside)
    and its branch made of chain convs, their activations, no-ops and identity joins alone."""
    if not block.removable:
        return f"block {block.join} is not removable: {block.reason}"
    return block.fold_reason


def remove_refusal(block: ResidualBlock) -> str | None:
    """Why ``block`` cannot be removed (x + f(x) -> x), or None."""
    return None if block.removable else f"block {block.join} is not removable: {block.reason}"
