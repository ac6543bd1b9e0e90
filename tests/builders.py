"""Build small ONNX graphs with onnx.helper for tests (no exporter involved)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Append nodes one call at a time; each call returns the name of the new tensor.

    >>> g = GraphBuilder((1, 4, 8, 8)); y = g.relu(g.conv(g.input, 4)); model = g.build([y])
    """

    def __init__(self, input_shape: tuple = ("N", 4, 8, 8), seed: int = 0, opset: int = 17) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.input = "input"
        self.input_shape = input_shape
        self.channels = {self.input: input_shape[1]}
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, value: np.ndarray, prefix: str = "w") -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], channels: int | None = None, name: str | None = None, **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or self._name(op), **attrs))
        self.channels[out] = channels if channels is not None else self.channels.get(inputs[0])
        return out

    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bias: bool = True,
             pad: int | None = None, name: str | None = None) -> str:
        cin = self.channels[x]
        w = self.rng.normal(0, (2 / (cin // groups * k * k)) ** 0.5, (cout, cin // groups, k, k)).astype(np.float32)
        inputs = [x, self.const(w)]
        if bias:
            inputs.append(self.const(self.rng.normal(0, 0.1, cout).astype(np.float32), "b"))
        p = k // 2 if pad is None else pad
        return self.node("Conv", inputs, cout, name=name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[p, p, p, p], group=groups)

    def bn(self, x: str) -> str:
        c = self.channels[x]
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.1, c), self.rng.normal(0, 0.1, c),
                  self.rng.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x] + [self.const(p.astype(np.float32), "bn") for p in params],
                         epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def add(self, a: str, b: str, name: str | None = None) -> str:
        return self.node("Add", [a, b], name=name)

    def bias_add(self, x: str) -> str:
        return self.node("Add", [x, self.const(self.rng.normal(0, 1, (1, self.channels[x], 1, 1)).astype(np.float32))])

    def build(self, outputs: list[str], output_shapes: dict[str, tuple] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(self.input, TensorProto.FLOAT, list(self.input_shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        onnx.checker.check_model(model, full_check=True)
        return model


def residual_block(g: GraphBuilder, x: str, projection: bool = False, stride: int = 1,
                   shortcut_first: bool = True, cout: int | None = None) -> str:
    """ResNet basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""
    cout = cout or g.channels[x]
    y = g.relu(g.bn(g.conv(x, cout, stride=stride, bias=False)))
    y = g.bn(g.conv(y, cout, bias=False))
    s = g.bn(g.conv(x, cout, k=1, stride=stride, bias=False)) if projection else x
    return g.relu(g.add(s, y) if shortcut_first else g.add(y, s))
