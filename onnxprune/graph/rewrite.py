"""Rewrite passes over a normalized onnx-graphsurgeon graph.

Each pass checks its preconditions (raising ``RewriteError`` before touching the graph), changes
the graph in place, and leaves it for ``finish`` (cleanup + toposort), so that no dangling node or
initializer survives. Whether a pass keeps the model's function is stated in its docstring:

- ``remove_block``: drops a residual branch (x + f(x) -> x): changes the function by design.
- ``replace_with_shortcut``: a projection block becomes its shortcut alone: changes the function.
- ``drop_activation``: removes an activation: changes the function.
- ``merge_run``: a run of convs with nothing but identity joins and no-ops between them (its
  activations dropped first) becomes one conv: exact away from the borders.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import OnnxPruneError
from onnxprune.graph import merge, rules
from onnxprune.graph.analysis import ResidualBlock, through_noops
from onnxprune.graph.order import toposort
from onnxprune.graph.ops import NO_OP, Activation, activation_after, activation_containing, conv_info, variable_inputs


class RewriteError(OnnxPruneError):
    """A rewrite's precondition does not hold; the graph was not changed."""


def finish(graph: gs.Graph) -> gs.Graph:
    return toposort(graph.cleanup(remove_unused_graph_inputs=False))


def bypass(graph: gs.Graph, old: gs.Variable, new: gs.Variable) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name through an Identity."""
    for consumer in list(old.outputs):
        for k, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[k] = new
    if old in graph.outputs:
        old.inputs.clear()
        graph.nodes.append(gs.Node("Identity", name=f"{old.name}/bypass", inputs=[new], outputs=[old]))


def node_named(graph: gs.Graph, name: str) -> gs.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise RewriteError(f"no node named {name!r} in the model")


def remove_block(graph: gs.Graph, block: ResidualBlock) -> None:
    """x + f(x) -> x: the join's readers read the block's input; the branch goes (SLP's move). What reads the
    join stays, so a post-LN block LN(x + f(x)) becomes LN(x) (docs/algorithms.md sections 0 and 9)."""
    if not block.removable:
        raise RewriteError(f"block {block.join} is not removable: {block.reason}")
    _keep_shortcut(graph, block)


def replace_with_shortcut(graph: gs.Graph, block: ResidualBlock) -> None:
    """proj(x) + f(x) -> proj(x): keeps a projection block's shortcut alone (a different function)."""
    if block.shortcut != "projection":
        raise RewriteError(f"block {block.join} has no projection shortcut to keep (shortcut: {block.shortcut})")
    _keep_shortcut(graph, block)


def _keep_shortcut(graph: gs.Graph, block: ResidualBlock) -> None:
    join = node_named(graph, block.join)
    others = [t for t in variable_inputs(join) if t.name != block.branch_output and through_noops(t).name != block.branch_output]
    if block.branch_output is None or len(others) != 1:
        raise RewriteError(f"cannot tell the shortcut of block {block.join} from its branch")
    bypass(graph, join.outputs[0], others[0])


def activation_of(graph: gs.Graph, name: str) -> Activation:
    """The activation named by one of its nodes, or by the conv (or join) it follows."""
    node = node_named(graph, name)
    outputs = {t.name for t in graph.outputs}
    if node.op == "Conv" or node.op in ("Add", "Sum"):
        act = activation_after(node.outputs[0], outputs)
        if act is None:
            raise RewriteError(f"no activation follows {name!r}")
        return act
    act = activation_containing(node, outputs)
    if act is None:
        raise RewriteError(f"node {name!r} ({node.op}) is not part of an activation onnxprune recognizes")
    return act


def drop_activation(graph: gs.Graph, act: Activation) -> None:
    """act(x) -> x."""
    bypass(graph, act.output, act.input)


def drop_conv(graph: gs.Graph, conv: gs.Node) -> None:
    """conv(x) -> x, for a conv whose output has its input's shape (LayerMerge's pruned conv)."""
    x, y = conv.inputs[0], conv.outputs[0]
    if x.shape is None or y.shape is None or list(x.shape) != list(y.shape):
        raise RewriteError(f"conv {conv.name} changes the shape of its input: it cannot become an identity")
    bypass(graph, y, x)


def merge_run(graph: gs.Graph, conv_names: list[str], through_join: str | None = None) -> gs.Node:
    """Replace convs ``conv_names`` (consecutive on the chain) by one conv.

    Between them there may be no-ops and joins of identity residual blocks that lie wholly inside the
    run; activations must have been dropped before (a RewriteError names one that is left). With
    ``through_join`` (the join of an identity block whose span the run covers exactly) the identity
    is folded in too: x + f(x) becomes one conv with the identity added at the centre tap. Returns
    the new conv.
    """
    convs = [node_named(graph, n) for n in conv_names]
    if not convs or (len(convs) < 2 and through_join is None):
        raise RewriteError("a merge needs at least two convs, or one conv and the join it covers")
    infos = [conv_info(conv) for conv in convs]
    for conv, info in zip(convs, infos):
        if info is None:
            raise RewriteError(f"{conv.name} is not a conv with a constant weight")
        if refusal := rules.merge_refusal(info, f"conv {conv.name}"):
            raise RewriteError(refusal)
    if refusal := rules.stride_refusal(infos, conv_names):
        raise RewriteError(refusal)
    x = convs[0].inputs[0]
    end = node_named(graph, through_join).outputs[0] if through_join else convs[-1].outputs[0]
    region = _region(x, end)
    _check_region(graph, region, convs, x, end)
    final = _map_of_region(graph, region, convs, x, end)
    if x.shape is None or end.shape is None or not all(isinstance(d, int) for d in list(x.shape[2:]) + list(end.shape[2:])):
        raise RewriteError(f"merging {conv_names[0]}..{conv_names[-1]} needs static spatial shapes")
    try:
        attrs = merge.to_conv(final, tuple(x.shape[2:]), tuple(end.shape[2:]), np.asarray(convs[0].inputs[1].values).dtype)
    except ValueError as exc:
        raise RewriteError(f"cannot merge {conv_names[0]}..{conv_names[-1]}: {exc}") from None
    name = f"{convs[0].name}/merged"
    weight = gs.Constant(f"{name}.weight", attrs.pop("weight"))
    bias = gs.Constant(f"{name}.bias", attrs.pop("bias"))
    end.inputs.clear()
    new = gs.Node("Conv", name=name, attrs=attrs, inputs=[x, weight, bias], outputs=[end])
    graph.nodes.append(new)
    return new


def _region(x: gs.Variable, end: gs.Variable) -> list[gs.Node]:
    """Nodes on a path from ``x`` to ``end`` (unordered)."""
    forward: set[int] = set()
    stack = [x]
    while stack:
        for node in stack.pop().outputs:
            if id(node) not in forward:
                forward.add(id(node))
                stack.extend(node.outputs)
    region, seen, stack = [], set(), [end]
    while stack:
        t = stack.pop()
        if t is x or not t.inputs:
            continue
        node = t.inputs[0]
        if id(node) in forward and id(node) not in seen:
            seen.add(id(node))
            region.append(node)
            stack.extend(variable_inputs(node))
    return region


def _check_region(graph: gs.Graph, region: list[gs.Node], convs: list[gs.Node], x: gs.Variable, end: gs.Variable) -> None:
    inside = {id(n) for n in region}
    outputs = {t.name for t in graph.outputs}
    names = {c.name for c in convs}
    for node in region:
        if node.op == "Conv" and node.name not in names:
            raise RewriteError(f"the merge skips conv {node.name}, which lies between its convs")
        for t in node.outputs:
            if t is end:
                continue
            if t.name in outputs or any(id(c) not in inside for c in t.outputs):
                reader = next((c.name for c in t.outputs if id(c) not in inside), "the graph output")
                raise RewriteError(f"tensor {t.name} inside the merge is also read by {reader}")
        for t in variable_inputs(node):
            if t is not x and (not t.inputs or id(t.inputs[0]) not in inside):
                raise RewriteError(f"node {node.name} inside the merge reads {t.name} from outside the run")


def _map_of_region(graph: gs.Graph, region: list[gs.Node], convs: list[gs.Node], x: gs.Variable,
                   end: gs.Variable) -> merge.LinearMap:
    outputs = {t.name for t in graph.outputs}
    channels = conv_info(convs[0]).in_channels
    spatial = len(conv_info(convs[0]).kernel)
    maps: dict[str, merge.LinearMap] = {x.name: merge.identity_map(channels, spatial)}
    islands: dict[str, Activation] = {}
    for t in [x] + [o for n in region for o in n.outputs]:
        act = activation_after(t, outputs)
        if act is not None:
            islands[act.output.name] = act
    members = {id(n) for act in islands.values() for n in act.nodes}
    position = {id(n): i for i, n in enumerate(graph.nodes)}  # the graph is topologically sorted
    for node in sorted(region, key=lambda n: position[id(n)]):
        out = node.outputs[0]
        if node.op == "Conv":
            info = conv_info(node)
            spatial_pads = info.pads[: len(info.kernel)]
            bias = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else None
            maps[out.name] = merge.compose(maps[node.inputs[0].name], merge.conv_map(
                np.asarray(node.inputs[1].values), bias, info.stride, spatial_pads, info.groups))
        elif id(node) in members:  # the plan drops the activations it merges across: none may be left
            act = next(a for a in islands.values() if any(n is node for n in a.nodes))
            raise RewriteError(f"activation {act.nodes[-1].name} ({act.kind}) lies inside the merge: a merge removes "
                               "only the activations the plan drops (drop_activations)")
        elif node.op in NO_OP:
            maps[out.name] = maps[variable_inputs(node)[0].name]
        elif node.op in ("Add", "Sum") and len(variable_inputs(node)) == 2:
            a, b = (maps[t.name] for t in variable_inputs(node))
            try:
                maps[out.name] = merge.add(a, b)
            except ValueError as exc:
                raise RewriteError(f"join {node.name}: {exc}") from None
        else:
            raise RewriteError(f"{node.op} node {node.name} lies inside the merge: it cannot be absorbed")
    return maps[end.name]
