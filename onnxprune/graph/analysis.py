"""Depth structure of an ONNX graph: residual blocks and the conv chain (docs/algorithms.md section 0).

Nothing here is written per architecture. The graph is read as a data-flow DAG of the nodes that
carry activations (``data`` nodes); shape arithmetic (``Shape`` and what is computed from it) and
constant subgraphs are kept out of it, so a dynamic-batch ``Reshape`` inside an attention block
does not hide the block. Then:

- with several graph inputs, the one most nodes depend on is the residual stream's source; the others
  are *side inputs* (an attention mask, token-type ids), and what is computed from them and constants
  alone is kept out of the DAG like a constant, so a mask added to attention scores is a bias;
- a **join** is an ``Add``/``Sum`` of two distinct data tensors;
- its **fork** is the nearest common dominator of the two producers (virtual source = node 0);
- the block's body is every data node on a path fork -> join; each join input's exclusive part of
  the body decides the shortcut: empty (identity), one linear op (projection), else the branch;
- a block is **removable** when its shortcut is the identity, the fork hands it one tensor (side tensors
  it reads besides do not count), its input and output have the same shape and type, and nothing
  outside the block reads a tensor of its branch. Post-LN blocks (``LN(x + f(x))``, BERT) are found
  like pre-LN ones (``x + f(LN(x))``, ViT): the LayerNorm after the join is not part of the block.

The chain is the list of convolutions on the main path in topological order, with the activation
after each one, the links between consecutive convs (through an activation, through a residual
join, or interrupted by a barrier), residual spans and stride breaks: the vocabulary LayerMerge
(Kim et al., ICML 2024) needs, derived here instead of hard-coded.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.graph.dominators import common_dominator, immediate_dominators
from onnxprune.graph.io import default_opset, load_notes
from onnxprune.graph.normalize import to_graph
from onnxprune.graph.ops import (
    NO_OP,
    SHAPE_OPS,
    Activation,
    activation_after,
    activation_attrs,
    activation_containing,
    conv_info,
    node_macs,
    variable_inputs,
)

LINEAR_OPS = {"Conv", "Gemm", "MatMul"}
# Ops allowed beside the one linear op of a projection shortcut (folded or unfolded BN, a pool).
_PROJECTION_EXTRAS = NO_OP | {"BatchNormalization", "AveragePool", "MaxPool"}
_SOURCE = 0


@dataclass
class ResidualBlock:
    index: int
    join: str
    fork: str | None  # None: the block starts at a graph input
    input: str | None  # the tensor the shortcut reads; None if the fork hands the block several tensors
    output: str
    shortcut: str  # "identity" | "projection" | "unknown"
    removable: bool
    reason: str | None
    params: int
    macs: int
    macs_share: float
    parent: int | None
    input_shape: list | None
    output_shape: list | None
    branch_nodes: list[str] = field(default_factory=list)
    shortcut_nodes: list[str] = field(default_factory=list)
    branch_output: str | None = None  # the join input that comes from the branch
    fold_reason: str | None = None  # why the identity cannot fold into one conv over the branch (graph/rules.py)


@dataclass
class ChainConv:
    index: int
    name: str
    kernel: list[int]
    stride: list[int]
    dilation: list[int]
    pads: list[int]
    groups: int
    in_channels: int
    out_channels: int
    depthwise: bool
    input_shape: list | None
    output_shape: list | None
    activation: str | None
    activation_nodes: list[str]
    block: int | None  # innermost residual block whose branch holds this conv
    macs: int
    params: int
    activation_attrs: dict = field(default_factory=dict)  # what besides its kind determines it (ops.activation_attrs)


@dataclass
class Link:
    """What lies between chain convs ``source`` and ``source + 1`` (LayerMerge position ``source``)."""

    source: int
    activations: list[str]
    joins: list[int]
    barrier: str | None
    escape: str | None = None  # a tensor between the two convs that something else reads too
    activation_nodes: list[str] = field(default_factory=list)  # the nodes of ``activations``, in order


@dataclass
class Structure:
    model: dict
    residual_blocks: list[ResidualBlock]
    convs: list[ChainConv]
    shortcut_convs: list[str]
    links: list[Link]
    spans: list[dict]
    stride_breaks: list[int]
    barriers: list[dict]
    macs: int
    params: int
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


class _Dataflow:
    """The data nodes of a graph as a DAG over integers (0 = virtual source), in topological order.

    Every tensor has a kind: ``data`` (computed from the residual stream's source), ``side`` (from
    the other graph inputs and constants only: an attention mask, position ids), ``meta`` (shape
    arithmetic) or ``const``. Only data nodes are in the DAG (docs/algorithms.md section 0)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.graph_outputs = {t.name for t in graph.outputs}
        self.side_inputs = side_inputs(graph)
        self.kind: dict[str, str] = {t.name: "side" if t.name in self.side_inputs else "data" for t in graph.inputs}
        self.nodes: list[gs.Node | None] = [None]
        self.index: dict[int, int] = {}
        self.meta_nodes: list[gs.Node] = []
        for node in graph.nodes:
            kinds = {self.kind.get(t.name, "const") for t in variable_inputs(node)}
            if node.op in SHAPE_OPS and kinds:
                out_kind = "meta"
            elif "data" in kinds:
                out_kind = "data"
            elif "side" in kinds:
                out_kind = "side"
            elif "meta" in kinds:
                out_kind = "meta"
            else:
                out_kind = "const"
            for t in node.outputs:
                self.kind[t.name] = out_kind
            if out_kind == "data":
                self.index[id(node)] = len(self.nodes)
                self.nodes.append(node)
            elif out_kind == "meta":
                self.meta_nodes.append(node)
        self.preds: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes[1:], start=1):
            for t in self.data_inputs(node):
                p = self.producer(t)
                if p not in self.preds[i]:
                    self.preds[i].append(p)
        self.idom = immediate_dominators(self.preds)

    def data_inputs(self, node: gs.Node) -> list[gs.Variable]:
        return [t for t in variable_inputs(node) if self.kind.get(t.name) == "data"]

    def producer(self, tensor: gs.Tensor) -> int:
        """Index of the data node producing ``tensor``; the source for a graph input."""
        return self.index[id(tensor.inputs[0])] if tensor.inputs else _SOURCE

    def between(self, start: int, end: int) -> set[int]:
        """Nodes on a path start -> end, without ``start``, with ``end`` (start dominates end)."""
        seen = {end} if end != start else set()
        queue = deque(seen)
        while queue:
            for p in self.preds[queue.popleft()]:
                if p != start and p not in seen:
                    seen.add(p)
                    queue.append(p)
        return seen


def side_inputs(graph: gs.Graph) -> list[str]:
    """The graph inputs that are not the residual stream's source (docs/algorithms.md section 0).

    The source is the input that most nodes depend on (the first such input on a tie): a BERT's
    ``input_ids``, whose embeddings every layer carries, not its ``attention_mask``, which only
    biases the attention scores. Shape arithmetic (``Shape``, ``Size``) carries no input's values."""
    if len(graph.inputs) < 2:
        return []
    depends: dict[str, int] = {t.name: 1 << k for k, t in enumerate(graph.inputs)}  # tensor -> bit set of inputs
    counts = [0] * len(graph.inputs)
    for node in graph.nodes:
        if node.op in SHAPE_OPS:
            continue
        bits = 0
        for t in variable_inputs(node):
            bits |= depends.get(t.name, 0)
        for t in node.outputs:
            depends[t.name] = bits
        for k in range(len(counts)):
            counts[k] += bits >> k & 1
    source = max(range(len(counts)), key=lambda k: (counts[k], -k))
    return [t.name for k, t in enumerate(graph.inputs) if k != source]


def through_noops(tensor: gs.Variable) -> gs.Variable:
    while tensor.inputs and tensor.inputs[0].op in NO_OP and variable_inputs(tensor.inputs[0]):
        tensor = variable_inputs(tensor.inputs[0])[0]
    return tensor


def analyze_model(model: onnx.ModelProto) -> Structure:
    """Analyze a loaded (shape-inferred) model. The model is not modified."""
    return analyze_graph(to_graph(model), model)


def analyze_graph(graph: gs.Graph, model: onnx.ModelProto | None = None) -> Structure:
    """Analyze a normalized, topologically sorted graph."""
    flow = _Dataflow(graph)
    notes: list[str] = load_notes(model) if model is not None else []
    total_macs = sum(node_macs(n) for n in graph.nodes)
    total_params = _count_params(graph.nodes, flow.kind)
    if flow.side_inputs:
        notes.append(f"side inputs {flow.side_inputs}: not the residual stream's source; blocks may read them")
    blocks = _find_blocks(flow, total_macs, notes)
    convs, shortcut_convs, links = _find_chain(flow, blocks, notes)
    _mark_foldable(flow, blocks, convs)
    spans = _spans(blocks, convs, notes)
    stride_breaks = [c.index for c in convs if any(s > 1 for s in c.stride)]
    barriers = [{"position": link.source, "op": link.barrier} for link in links if link.barrier]
    if not blocks:
        notes.append("no residual block found: nothing for block removal (SLP); LayerMerge can still merge convs")
    return Structure(
        model=_model_summary(graph, model),
        residual_blocks=blocks,
        convs=convs,
        shortcut_convs=shortcut_convs,
        links=links,
        spans=spans,
        stride_breaks=stride_breaks,
        barriers=barriers,
        macs=total_macs,
        params=total_params,
        notes=notes,
    )


def _model_summary(graph: gs.Graph, model: onnx.ModelProto | None) -> dict:
    def describe(t: gs.Variable) -> dict:
        return {"name": t.name, "shape": _shape(t), "dtype": str(t.dtype) if t.dtype is not None else None}

    summary = {
        "inputs": [describe(t) for t in graph.inputs],
        "outputs": [describe(t) for t in graph.outputs],
        "nodes": len(graph.nodes),
    }
    if model is not None:
        summary.update(opset=default_opset(model), producer=f"{model.producer_name} {model.producer_version}".strip())
    return summary


def _shape(t: gs.Tensor) -> list | None:
    return None if t.shape is None else [d if isinstance(d, int) else str(d) for d in t.shape]


def _find_blocks(flow: _Dataflow, total_macs: int, notes: list[str]) -> list[ResidualBlock]:
    blocks: list[ResidualBlock] = []
    bodies: list[tuple[int, set[int]]] = []  # (join index, body) per block
    for j, node in enumerate(flow.nodes):
        if node is None or node.op not in ("Add", "Sum"):
            continue
        inputs = flow.data_inputs(node)
        if len(inputs) != 2 or len(variable_inputs(node)) != 2:
            continue
        a, b = (through_noops(t) for t in inputs)
        if a.name == b.name:
            continue
        pa, pb = flow.producer(a), flow.producer(b)
        fork = common_dominator(flow.idom, pa, pb)
        body = flow.between(fork, j)
        anc_a = flow.between(fork, pa) if pa != fork else set()
        anc_b = flow.between(fork, pb) if pb != fork else set()
        only_a, only_b = anc_a - anc_b, anc_b - anc_a
        kind_a, kind_b = _path_kind(flow, only_a), _path_kind(flow, only_b)
        shortcut, short_side = _choose_shortcut(flow, (kind_a, only_a), (kind_b, only_b))
        if short_side is None:
            shortcut_nodes, branch_out = set(), None
        else:
            shortcut_nodes = (only_a, only_b)[short_side]
            branch_out = (b, a)[short_side]
        block = _make_block(flow, len(blocks), node, fork, body, shortcut, shortcut_nodes, branch_out, total_macs)
        if shortcut == "unknown":
            notes.append(f"join {node.name}: neither input is an identity or a single linear op; shortcut unknown")
        blocks.append(block)
        bodies.append((j, body))
    for block, (j, body) in zip(blocks, bodies):
        enclosing = [k for k, (_, other) in enumerate(bodies) if other is not body and j in other]
        if enclosing:
            block.parent = min(enclosing, key=lambda k: len(bodies[k][1]))
    return blocks


def _path_kind(flow: _Dataflow, nodes: set[int]) -> str:
    ops = [flow.nodes[i].op for i in nodes]
    if all(op in NO_OP for op in ops):
        return "identity"
    linear = [op for op in ops if op in LINEAR_OPS]
    if len(linear) == 1 and all(op in LINEAR_OPS or op in _PROJECTION_EXTRAS for op in ops):
        return "projection"
    return "branch"


def _choose_shortcut(flow: _Dataflow, a: tuple[str, set[int]], b: tuple[str, set[int]]) -> tuple[str, int | None]:
    """(shortcut kind, 0 or 1 = which join input is the shortcut, None if undecidable)."""
    kinds = (a[0], b[0])
    if "identity" in kinds:
        return "identity", kinds.index("identity")
    if kinds.count("projection") == 1:
        return "projection", kinds.index("projection")
    if kinds == ("projection", "projection"):
        macs = [sum(node_macs(flow.nodes[i]) for i in side[1]) for side in (a, b)]
        if macs[0] != macs[1]:
            return "projection", macs.index(min(macs))
    return "unknown", None


def _make_block(flow: _Dataflow, index: int, join: gs.Node, fork: int, body: set[int], shortcut: str,
                shortcut_nodes: set[int], branch_out: gs.Variable | None, total_macs: int) -> ResidualBlock:
    body_nodes = [flow.nodes[i] for i in sorted(body)]
    branch = [n for i, n in zip(sorted(body), body_nodes) if i not in shortcut_nodes and n is not join]
    fork_node = flow.nodes[fork]
    fork_tensors = {t.name: t for n in body_nodes for t in flow.data_inputs(n) if flow.producer(t) == fork}
    block_input = next(iter(fork_tensors.values())) if len(fork_tensors) == 1 else None
    out = join.outputs[0]
    macs = sum(node_macs(n) for n in branch)
    block = ResidualBlock(
        index=index, join=join.name, fork=fork_node.name if fork_node is not None else None,
        input=block_input.name if block_input is not None else None, output=out.name, shortcut=shortcut,
        removable=False, reason=None, params=_count_params(branch, flow.kind), macs=macs,
        macs_share=round(macs / total_macs, 6) if total_macs else 0.0, parent=None,
        input_shape=_shape(block_input) if block_input is not None else None, output_shape=_shape(out),
        branch_nodes=[n.name for n in branch], shortcut_nodes=[flow.nodes[i].name for i in sorted(shortcut_nodes)],
        branch_output=branch_out.name if branch_out is not None else None,
    )
    block.reason = _why_not_removable(flow, block, block_input, join, body_nodes)
    block.removable = block.reason is None
    return block


def _why_not_removable(flow: _Dataflow, block: ResidualBlock, block_input: gs.Variable | None, join: gs.Node,
                       body_nodes: list[gs.Node]) -> str | None:
    if block.shortcut != "identity":
        return f"{block.shortcut} shortcut"
    if block_input is None:
        return "the fork hands the block more than one tensor"
    out = join.outputs[0]
    if block_input.shape is None or out.shape is None or any(d is None for d in list(block_input.shape) + list(out.shape)):
        return "input or output shape unknown"
    if _shape(block_input) != _shape(out) or block_input.dtype != out.dtype:
        return f"input shape {_shape(block_input)} differs from output shape {_shape(out)}"
    inside = {id(n) for n in body_nodes}
    for meta in reversed(flow.meta_nodes):  # consumers come later in topological order
        consumers = [c for t in meta.outputs for c in t.outputs]
        if consumers and all(id(c) in inside for c in consumers):
            inside.add(id(meta))
    for node in body_nodes + [n for n in flow.meta_nodes if id(n) in inside]:
        if node is join:
            continue
        for t in node.outputs:
            if reader := _reader_outside(flow, t, inside):
                return f"branch tensor {t.name} is read outside the block by {reader}"
    return None


def _reader_outside(flow: _Dataflow, tensor: gs.Variable, inside: set[int]) -> str | None:
    """A node outside ``inside`` (node ids) that reads ``tensor``, or "the graph output"; None if none does."""
    if tensor.name in flow.graph_outputs:
        return "the graph output"
    return next((c.name for c in tensor.outputs if id(c) not in inside), None)


def _count_params(nodes: list[gs.Node], kind: dict[str, str]) -> int:
    """Parameters: elements of the floating-point, non-scalar constants the nodes read (directly or
    through constant-only nodes), each counted once. Shapes, axes and scalars are not parameters."""
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    stack = [t for n in nodes for t in n.inputs]
    while stack:
        t = stack.pop()
        if t.name in seen or t.is_empty():
            continue
        seen.add(t.name)
        if isinstance(t, gs.Constant):
            size = math.prod(t.shape)
            if size > 1 and np.issubdtype(np.dtype(t.dtype), np.floating):
                sizes[t.name] = size
        elif kind.get(t.name) == "const" and t.inputs:
            stack.extend(t.inputs[0].inputs)
    return sum(sizes.values())


def _find_chain(flow: _Dataflow, blocks: list[ResidualBlock], notes: list[str]):
    shortcut_names = {name for b in blocks for name in b.shortcut_nodes}
    branch_of: dict[str, int] = {}
    for b in sorted(blocks, key=lambda b: len(b.branch_nodes), reverse=True):
        for name in b.branch_nodes:
            branch_of[name] = b.index  # smaller (inner) blocks overwrite outer ones
    tensors = flow.graph.tensors()
    joined = {b.branch_output: b.output for b in blocks if b.branch_output}
    convs: list[ChainConv] = []
    conv_nodes: list[gs.Node] = []
    shortcut_convs: list[str] = []
    for node in flow.nodes[1:]:
        if node.op != "Conv":
            continue
        info = conv_info(node)
        if info is None:
            notes.append(f"conv {node.name} has a non-constant weight: left out of the chain")
            continue
        if node.name in shortcut_names:
            shortcut_convs.append(node.name)
            continue
        act = activation_after(node.outputs[0], flow.graph_outputs)
        if act is None and node.outputs[0].name in joined:  # conv -> join -> activation (ResNet)
            act = activation_after(tensors[joined[node.outputs[0].name]], flow.graph_outputs)
        convs.append(ChainConv(
            index=len(convs), name=node.name, kernel=list(info.kernel), stride=list(info.stride),
            dilation=list(info.dilation), pads=list(info.pads), groups=info.groups, in_channels=info.in_channels,
            out_channels=info.out_channels, depthwise=info.depthwise, input_shape=_shape(node.inputs[0]),
            output_shape=_shape(node.outputs[0]), activation=act.kind if act else None,
            activation_nodes=[n.name for n in act.nodes] if act else [], block=branch_of.get(node.name),
            macs=node_macs(node), params=_count_params([node], flow.kind),
            activation_attrs=activation_attrs(act) if act else {},
        ))
        conv_nodes.append(node)
    join_blocks = {b.join: b for b in blocks}
    links = [_link(flow, i, conv_nodes[i], conv_nodes[i + 1], join_blocks) for i in range(len(conv_nodes) - 1)]
    return convs, shortcut_convs, links


def _link(flow: _Dataflow, i: int, prev: gs.Node, conv: gs.Node, join_blocks: dict[str, ResidualBlock]) -> Link:
    """Walk back from ``conv``'s input to ``prev``'s output through activations and identity joins."""
    link = Link(source=i, activations=[], joins=[], barrier=None)
    tensor = conv.inputs[0]
    path: list[gs.Node] = [conv]  # the nodes walked through, the ones that may read the tensors on the way
    for _ in range(32):
        while tensor.inputs and tensor.inputs[0].op in NO_OP and variable_inputs(tensor.inputs[0]):
            path.append(tensor.inputs[0])
            tensor = variable_inputs(tensor.inputs[0])[0]
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is prev:
            link.escape = _escape(flow, prev, path)
            return link
        if producer is None:
            link.barrier = "graph input"
            return link
        block = join_blocks.get(producer.name)
        if block is not None:
            if block.branch_output is None:
                link.barrier = f"{block.shortcut} join {block.join}"
                return link
            if block.shortcut != "identity":  # a merged conv cannot absorb a projection; walk on for the activation
                link.barrier = f"{block.shortcut} join {block.join}"
            link.joins.append(block.index)
            path.append(producer)
            tensor = next(t for t in producer.inputs if t.name == block.branch_output or through_noops(t).name == block.branch_output)
            continue
        act = _activation_ending_at(flow, tensor)
        if act is not None:
            link.activations.insert(0, act.kind)
            link.activation_nodes[:0] = [n.name for n in act.nodes]
            path.extend(act.nodes)
            tensor = act.input
            continue
        link.barrier = producer.op
        return link
    link.barrier = "path too long"
    return link


def _escape(flow: _Dataflow, prev: gs.Node, path: list[gs.Node]) -> str | None:
    """A tensor computed between two chain convs (by ``prev`` or on ``path``, the nodes from there to the
    second conv, which comes first) that a node off the path, or the graph's output, reads as well: a merge
    of the two convs would lose it."""
    on_path = {id(n) for n in path}
    made_here = on_path | {id(prev)}
    for node in path:
        for t in variable_inputs(node):
            if not t.inputs or id(t.inputs[0]) not in made_here:
                continue  # e.g. the shortcut input of a join on the way
            if reader := _reader_outside(flow, t, on_path):
                return f"tensor {t.name} between chain convs is also read by {reader}"
    return None


def _mark_foldable(flow: _Dataflow, blocks: list[ResidualBlock], convs: list[ChainConv]) -> None:
    """Set ``fold_reason`` of every identity block: its branch may hold chain convs, their activations,
    no-ops and joins, nothing else (graph/rewrite.merge_run absorbs exactly these)."""
    absorbable = {c.name for c in convs} | {n for c in convs for n in c.activation_nodes}
    ops = {n.name: n.op for n in flow.nodes[1:]}
    for b in blocks:
        if b.shortcut != "identity":
            continue
        for name in b.branch_nodes:
            op = ops.get(name)
            if name not in absorbable and op not in NO_OP and op not in ("Add", "Sum"):
                b.fold_reason = f"its branch holds {op} node {name}, which no conv can absorb"
                break
        else:
            if not any(c.name in set(b.branch_nodes) for c in convs):
                b.fold_reason = "its branch holds no chain conv"


def _activation_ending_at(flow: _Dataflow, tensor: gs.Variable) -> Activation | None:
    """The activation whose output is ``tensor``."""
    act = activation_containing(tensor.inputs[0], flow.graph_outputs)
    return act if act is not None and act.output.name == tensor.name else None


def _spans(blocks: list[ResidualBlock], convs: list[ChainConv], notes: list[str]) -> list[dict]:
    """Residual spans (source position, target position) of identity blocks over chain convs."""
    spans = []
    for b in blocks:
        if b.shortcut != "identity":
            continue
        inside = [c.index for c in convs if c.name in set(b.branch_nodes)]
        if not inside:
            continue
        if inside != list(range(inside[0], inside[-1] + 1)):
            notes.append(f"block {b.index} ({b.join}): its convs are not contiguous in the chain; no span recorded")
            continue
        spans.append({"source": inside[0] - 1, "target": inside[-1], "block": b.index})
    return spans
