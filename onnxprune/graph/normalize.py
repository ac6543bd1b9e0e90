"""Turn a loaded ModelProto into the onnx-graphsurgeon graph that analysis and rewrites work on.

Exporters differ in ways that do not change the function: the TorchScript exporter puts shared
weights behind ``Identity`` nodes, some exporters emit ``Constant`` nodes instead of initializers,
and unfolded ``BatchNormalization`` may follow a ``Conv``. ``normalize`` removes these differences:

- ``Constant`` nodes and ``Identity`` nodes of constants become plain constants;
- ``Conv -> BatchNormalization`` (inference form, constant statistics, the conv output read by
  the BN alone) becomes one ``Conv`` with W' = W * s, b' = (b - mean) * s + beta, where
  s = gamma / sqrt(var + eps), computed in float64 (exact to float32 rounding).

The caller's ModelProto is never modified: the graph is imported from it and changed alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import ``model`` into a normalized onnx-graphsurgeon graph (topologically sorted)."""
    graph = gs.import_onnx(model)
    normalize(graph)
    return graph


def normalize(graph: gs.Graph) -> gs.Graph:
    name_nodes(graph)
    fold_constant_nodes(graph)
    fold_batchnorm_into_conv(graph)
    return graph.cleanup().toposort()


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
    if len(bn.outputs) != 1 or int(bn.attrs.get("training_mode", 0)) != 0:
        return None
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None
    x = bn.inputs[0]
    if not x.inputs or len(x.outputs) != 1 or x.name in graph_outputs:
        return None
    conv = x.inputs[0]
    if conv.op != "Conv" or not isinstance(conv.inputs[1], gs.Constant):
        return None
    if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
        return None
    return conv


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto, keeping ``template``'s metadata, producer and IR version."""
    model = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    if template is not None:
        model.ir_version = template.ir_version
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    return model