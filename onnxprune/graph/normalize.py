"""Turn a loaded ModelProto into the onnx-graphsurgeon graph that analysis and rewrites work on.

Exporters differ in ways that do not change the function: the TorchScript exporter puts shared
weights behind ``Identity`` nodes, some exporters emit ``Constant`` nodes instead of initializers,
old exporters compute weights in the graph (``ConstantOfShape`` of a constant shape, then
``Reshape``, ``Unsqueeze``, ``Mul``...), and unfolded ``BatchNormalization`` may follow a ``Conv``.
``normalize`` removes these differences:

- ``Constant`` nodes and ``Identity`` nodes of constants become plain constants;
- constant subgraphs (nodes whose inputs are all constants, transitively) that end in a float
  tensor read by the rest of the graph are evaluated once with ``onnx.reference`` and replaced by
  that tensor (weights, biases, BN statistics); integer and boolean ones (shapes, axes, masks) stay
  as they are, and ``Shape`` of an activation is never constant, so symbolic dims survive;
- ``Conv -> BatchNormalization`` (inference form, constant statistics, the conv output read by
  the BN alone) becomes one ``Conv`` with W' = W * s, b' = (b - mean) * s + beta, where
  s = gamma / sqrt(var + eps), computed in float64 (exact to float32 rounding).

The caller's ModelProto is never modified: the graph is imported from it and changed alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxprune.graph.order import toposort

# Ops never evaluated ahead of time: random ones would be frozen to one draw, Constant nodes still
# present hold sparse or string values, and the ops with subgraphs are left to the runtime.
_UNFOLDABLE_OPS = {"Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                   "Multinomial", "Bernoulli", "If", "Loop", "Scan", "SequenceMap"}


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import ``model`` into a normalized onnx-graphsurgeon graph (topologically sorted)."""
    graph = gs.import_onnx(model)
    normalize(graph)
    return graph


def normalize(graph: gs.Graph) -> gs.Graph:
    name_nodes(graph)
    fold_constant_nodes(graph)
    fold_constant_subgraphs(graph)
    fold_batchnorm_into_conv(graph)
    return toposort(graph.cleanup())


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name (``<op>_<position>`` for unnamed ones), deterministically, so
    that plans can refer to nodes of graphs whose exporter left names out."""
    taken: set[str] = set()
    for position, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{position}"
        candidate, suffix = name, 1
        while candidate in taken:
            candidate, suffix = f"{name}_{suffix}", suffix + 1
        node.name = candidate
        taken.add(candidate)


def fold_constant_nodes(graph: gs.Graph) -> int:
    """Replace ``Constant`` nodes and ``Identity`` of a constant by the constant. Returns the count."""
    graph_outputs = {t.name for t in graph.outputs}
    folded = 0
    for node in list(graph.nodes):
        if len(node.outputs) != 1 or node.outputs[0].name in graph_outputs:
            continue
        out = node.outputs[0]
        if node.op == "Identity" and isinstance(node.inputs[0], gs.Constant):
            shared = node.inputs[0]  # readers share the initializer instead of a copy of it
            for reader in list(out.outputs):
                for k, t in enumerate(reader.inputs):
                    if t is out:
                        reader.inputs[k] = shared
            node.outputs.clear()
            folded += 1
        elif node.op == "Constant" and (value := _constant_node_value(node)) is not None:
            node.outputs.clear()
            out.to_constant(value)
            folded += 1
    return folded


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    return None  # sparse or string constants stay as nodes


def fold_constant_subgraphs(graph: gs.Graph) -> int:
    """Evaluate the constant subgraphs that compute float tensors read by non-constant nodes and
    replace those tensors by their values. Returns the number of tensors replaced.

    A node is constant when it is a deterministic default-domain op without subgraphs whose inputs
    are all constants or outputs of constant nodes. Only the constant nodes such a float tensor
    depends on run, each once, with ``onnx.reference`` fed the arrays as they are (no weight is
    serialized); intermediate values are dropped after their last use. Whatever depends on a node
    that fails to evaluate stays in the graph as it was.
    """
    toposort(graph)
    producers: dict[str, gs.Node] = {}
    constant_nodes: list[gs.Node] = []
    for node in graph.nodes:
        if _foldable(node, producers):
            producers.update((t.name, node) for t in node.outputs if not t.is_empty())
            constant_nodes.append(node)
    constant_ids = {id(n) for n in constant_nodes}
    graph_outputs = {t.name for t in graph.outputs}
    targets = [
        t for n in constant_nodes for t in n.outputs
        if not t.is_empty() and t.name not in graph_outputs and _maybe_float(t)
        and any(id(reader) not in constant_ids for reader in t.outputs)
    ]
    needed = _needed_nodes(targets, producers)
    values = _evaluate([n for n in constant_nodes if id(n) in needed], {t.name for t in targets}, graph.opset)
    folded = 0
    for tensor in targets:
        value = values.get(tensor.name)
        if value is None or not np.issubdtype(value.dtype, np.floating):
            continue
        producer = tensor.inputs[0]
        # A placeholder keeps the positions of the producer's other outputs; cleanup drops it.
        producer.outputs[producer.outputs.index(tensor)] = gs.Variable(f"{tensor.name}/folded")
        tensor.to_constant(np.ascontiguousarray(value))
        folded += 1
    return folded


def _foldable(node: gs.Node, producers: dict[str, gs.Node]) -> bool:
    if node.op in _UNFOLDABLE_OPS or (node.domain or "") not in ("", "ai.onnx") or not node.outputs:
        return False
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return False
    return all(isinstance(t, gs.Constant) or t.is_empty() or t.name in producers for t in node.inputs)


def _maybe_float(tensor: gs.Variable) -> bool:
    """Whether ``tensor`` is (or, with no type known, may be) a floating-point tensor."""
    if tensor.dtype is None:
        return True
    try:
        return np.issubdtype(np.dtype(tensor.dtype), np.floating)
    except TypeError:  # a type numpy does not know (bfloat16, float8): left as it is
        return False


def _needed_nodes(targets: list[gs.Variable], producers: dict[str, gs.Node]) -> set[int]:
    """The ids of the constant nodes the targets depend on."""
    seen: set[int] = set()
    stack = [producers[t.name] for t in targets]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(producers[t.name] for t in node.inputs if t.name in producers)
    return seen


def _evaluate(nodes: list[gs.Node], wanted: set[str], opset: int) -> dict[str, np.ndarray]:
    """Run ``nodes`` (topologically sorted, reading constants and each other's outputs) one by one;
    return the values of the ``wanted`` tensors that could be computed."""
    uses: dict[str, int] = {}
    for node in nodes:
        for t in node.inputs:
            uses[t.name] = uses.get(t.name, 0) + 1
    values: dict[str, np.ndarray] = {}
    result: dict[str, np.ndarray] = {}
    for node in nodes:
        feeds = {}
        for t in node.inputs:
            if t.is_empty():
                continue
            if t.name not in values and isinstance(t, gs.Constant):
                values[t.name] = np.asarray(t.values)  # read once, dropped after its last use below
            feeds[t.name] = values.get(t.name)  # None: the output of a node that failed
        outputs = [t.name for t in node.outputs if not t.is_empty()]
        computed = None
        if all(v is not None for v in feeds.values()):
            try:
                computed = _run(node, list(feeds), outputs, feeds, opset)
            except Exception:  # onnx.reference raises whatever the op implementation raises
                computed = None
        for t in node.inputs:  # drop intermediates after their last use
            uses[t.name] -= 1
            if uses[t.name] == 0 and t.name not in wanted:
                values.pop(t.name, None)
        for name, value in zip(outputs, computed or []):
            values[name] = value
            if name in wanted:
                result[name] = value
    return result


def _run(node: gs.Node, inputs: list[str], outputs: list[str], feeds: dict[str, np.ndarray], opset: int):
    function = onnx.helper.make_function("onnxprune.fold", "constant", inputs, outputs,
                                         [OnnxExporter.export_node(node)], [onnx.helper.make_opsetid("", opset)])
    return [np.asarray(v) for v in ReferenceEvaluator(function).run(None, feeds, attributes={})]


def fold_batchnorm_into_conv(graph: gs.Graph) -> int:
    """Fold every foldable ``Conv -> BatchNormalization`` pair. Returns the number folded."""
    graph_outputs = {t.name for t in graph.outputs}
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = _foldable_conv(bn, graph_outputs)
        if conv is None:
            continue
        gamma, beta, mean, var = (np.asarray(t.values, dtype=np.float64) for t in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        weight = np.asarray(conv.inputs[1].values)
        bias = np.asarray(conv.inputs[2].values, np.float64) if len(conv.inputs) > 2 else np.zeros(weight.shape[0])
        new_weight = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
        new_bias = (bias - mean) * scale + beta
        conv.inputs[1] = gs.Constant(f"{conv.name or conv.outputs[0].name}.weight_bnfold", new_weight.astype(weight.dtype))
        bias_const = gs.Constant(f"{conv.name or conv.outputs[0].name}.bias_bnfold", new_bias.astype(weight.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias_const
        else:
            conv.inputs.append(bias_const)
        out = bn.outputs[0]
        bn.outputs.clear()
        conv.outputs[0] = out
        folded += 1
    return folded


def _foldable_conv(bn: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    if len(bn.inputs) != 5 or len(bn.outputs) != 1 or int(bn.attrs.get("training_mode", 0)) != 0:
        return None  # (a BatchNormalization or Conv without its inputs is a damaged model: the checker names it)
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None
    x = bn.inputs[0]
    if not x.inputs or len(x.outputs) != 1 or x.name in graph_outputs:
        return None
    conv = x.inputs[0]
    if conv.op != "Conv" or len(conv.inputs) < 2 or not isinstance(conv.inputs[1], gs.Constant):
        return None
    if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
        return None
    return conv


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto, keeping ``template``'s metadata, producer and IR version."""
    model = gs.export_onnx(toposort(graph.cleanup()), do_type_check=False)
    if template is not None:
        model.ir_version = template.ir_version
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    return model