"""A trainable torch copy of an ONNX graph, and the write-back of its weights.

See docs/algorithms.md, "Differentiable copy of an ONNX graph".

- ``GraphModule(model)`` runs the graph's nodes in topological order with torch ops, following ONNX semantics for
  the model's default-domain opset. Only the nodes that the requested outputs need are run.
- Gated training (docs/algorithms.md section 5) hooks in through ``tensor_transforms`` (a function applied to a
  tensor as it is produced) and ``bypass`` (a node hands on one of its inputs; nodes no longer needed are skipped).
- Every float initializer, and every float tensor of more than one element held in a ``Constant`` node, is an
  ``nn.Parameter`` kept in float32 and keyed by its ONNX name; in the forward pass it is cast to its own dtype, so a
  float16 graph computes in float16. All other tensors (scalar constants, int64 shapes and axes) are buffers.
- The module computes exactly what the graph computes, in training mode too: ``Dropout`` stays an identity and
  ``BatchNormalization`` keeps its inference form, with all four of its tensors differentiable.
- ``write_back(model, module)`` copies the parameters into a copy of the model; a tensor whose value did not change
  keeps its bytes, so an untouched module gives back the model byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import Tensor, nn

from onnxprune.errors import OnnxPruneError

__all__ = ["GraphModule", "UnsupportedOperators", "write_back"]

TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16, TensorProto.UINT16: torch.uint16, TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.uint32, TensorProto.INT64: torch.int64, TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_DEFAULT_DOMAINS = ("", "ai.onnx")


class UnsupportedOperators(OnnxPruneError):
    """The graph needs operators (or operator variants) that GraphModule cannot run; the message names them all."""


# --------------------------------------------------------------------------------------------------------------------
# nodes and tensors
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One ONNX node, ready to run: attributes decoded, unused outputs blanked to ""."""

    op: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(hash=False, compare=False)
    opset: int

    def attr(self, key: str, default=None):
        return self.attrs.get(key, default)


def tensor_to_torch(proto: TensorProto) -> Tensor:
    """The value of a TensorProto as a torch tensor of the matching dtype (a copy)."""
    if proto.data_type not in TORCH_DTYPES:
        raise OnnxPruneError(f"tensor {proto.name!r} has type {TensorProto.DataType.Name(proto.data_type)}, "
                             f"which onnxprune cannot train")
    if onnx.external_data_helper.uses_external_data(proto):
        raise OnnxPruneError(f"tensor {proto.name!r} keeps its data in an external file; load the model with its data")
    array = numpy_helper.to_array(proto)
    if proto.data_type == TensorProto.BFLOAT16:
        return torch.from_numpy(np.array(array.view(np.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _attribute_value(attribute: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, TensorProto):
        return tensor_to_torch(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def default_opset(model: onnx.ModelProto) -> int:
    return next((e.version for e in model.opset_import if e.domain in _DEFAULT_DOMAINS), 1)


def _constant_node_value(node: onnx.NodeProto) -> Tensor | None:
    """The tensor a Constant node holds, or None for the kinds GraphModule cannot hold (strings, sparse)."""
    attribute = node.attribute[0] if len(node.attribute) == 1 else None
    if attribute is None:
        return None
    if attribute.name == "value":
        return tensor_to_torch(attribute.t) if attribute.t.data_type in TORCH_DTYPES else None
    value = onnx.helper.get_attribute_value(attribute)
    if attribute.name == "value_float":
        return torch.tensor(value, dtype=torch.float32)
    if attribute.name == "value_floats":
        return torch.tensor(value, dtype=torch.float32).reshape(len(value))
    if attribute.name == "value_int":
        return torch.tensor(value, dtype=torch.int64)
    if attribute.name == "value_ints":
        return torch.tensor(value, dtype=torch.int64).reshape(len(value))
    return None


def is_parameter(proto: TensorProto, in_constant_node: bool) -> bool:
    """Float initializers are parameters; so are float tensors of more than one element in Constant nodes."""
    if proto.data_type not in FLOAT_TYPES:
        return False
    return not in_constant_node or math.prod(proto.dims) > 1


# --------------------------------------------------------------------------------------------------------------------
# operators: each takes (node, inputs) and returns a tensor or a sequence of tensors (missing optional inputs are None)
# --------------------------------------------------------------------------------------------------------------------

Args = list[Tensor | None]
OPS: dict[str, Callable[[Node, Args], Tensor | Sequence[Tensor]]] = {}
# Variant checks run at construction: they return a description of what is unsupported, or None.
CHECKS: dict[str, Callable[[Node], str | None]] = {}


def _op(*names: str):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _opt(x: Args, i: int) -> Tensor | None:
    return x[i] if len(x) > i else None


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes_arg(node: Node, x: Args, since: int, index: int = 1, name: str = "axes") -> list[int] | None:
    """A list of ints that is an attribute before opset ``since`` and an optional input from then on."""
    if node.opset >= since:
        return _ints(_opt(x, index))
    return node.attr(name)


def _unary(fn: Callable[[Tensor], Tensor]):
    return lambda node, x: fn(x[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]):
    return lambda node, x: fn(x[0], x[1])


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]):
    return lambda node, x: functools.reduce(fn, x)


OPS.update({name: _unary(fn) for name, fn in {
    "Identity": lambda t: t, "Neg": torch.neg, "Abs": torch.abs, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal,
    "Exp": torch.exp, "Log": torch.log, "Tanh": torch.tanh, "Erf": torch.erf, "Sigmoid": torch.sigmoid,
    "Relu": torch.relu, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
    "Sin": torch.sin, "Cos": torch.cos, "Softsign": F.softsign, "Not": torch.logical_not, "IsNaN": torch.isnan,
    "HardSwish": F.hardswish, "Mish": F.mish,
}.items()})
OPS.update({name: _binary(fn) for name, fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "MatMul": torch.matmul, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor,
}.items()})
OPS.update({name: _variadic(fn) for name, fn in {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}.items()})


@_op("Mean")
def _mean(node: Node, x: Args) -> Tensor:
    return functools.reduce(torch.add, x) / len(x)


@_op("Div")
def _div(node: Node, x: Args) -> Tensor:
    if x[0].is_floating_point():
        return x[0] / x[1]
    return torch.div(x[0], x[1], rounding_mode="trunc")


@_op("Mod")
def _mod(node: Node, x: Args) -> Tensor:
    return torch.fmod(x[0], x[1]) if node.attr("fmod", 0) else torch.remainder(x[0], x[1])


@_op("Pow")
def _pow(node: Node, x: Args) -> Tensor:
    return torch.pow(x[0], x[1]).to(x[0].dtype)


@_op("Where")
def _where(node: Node, x: Args) -> Tensor:
    return torch.where(x[0].bool(), x[1], x[2])


# activations with attributes ---------------------------------------------------------------------------------------

@_op("LeakyRelu")
def _leaky_relu(node: Node, x: Args) -> Tensor:
    return F.leaky_relu(x[0], node.attr("alpha", 0.01))


@_op("PRelu")
def _prelu(node: Node, x: Args) -> Tensor:
    return torch.where(x[0] < 0, x[0] * x[1], x[0])


@_op("Elu")
def _elu(node: Node, x: Args) -> Tensor:
    return F.elu(x[0], node.attr("alpha", 1.0))


@_op("Celu")
def _celu(node: Node, x: Args) -> Tensor:
    return F.celu(x[0], node.attr("alpha", 1.0))


@_op("Selu")
def _selu(node: Node, x: Args) -> Tensor:
    alpha, gamma = node.attr("alpha", 1.67326319217681884765625), node.attr("gamma", 1.05070102214813232421875)
    negative = alpha * torch.expm1(torch.clamp(x[0], max=0))  # clamped so that exp never overflows
    return gamma * torch.where(x[0] > 0, x[0], negative)


@_op("ThresholdedRelu")
def _thresholded_relu(node: Node, x: Args) -> Tensor:
    return torch.where(x[0] > node.attr("alpha", 1.0), x[0], torch.zeros_like(x[0]))


@_op("HardSigmoid")
def _hard_sigmoid(node: Node, x: Args) -> Tensor:
    return torch.clamp(node.attr("alpha", 0.2) * x[0] + node.attr("beta", 0.5), 0, 1)


@_op("Softplus")
def _softplus(node: Node, x: Args) -> Tensor:
    return F.softplus(x[0])


@_op("Gelu")
def _gelu(node: Node, x: Args) -> Tensor:
    return F.gelu(x[0], approximate=node.attr("approximate", "none"))


@_op("Clip")
def _clip(node: Node, x: Args) -> Tensor:
    """torch.clamp with tensor bounds, so that gradients reach bounds that are parameters."""
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    else:
        low, high = _opt(x, 1), _opt(x, 2)
        low = None if low is None else low.to(x[0].dtype)
        high = None if high is None else high.to(x[0].dtype)
    if low is None and high is None:
        return x[0]
    return torch.clamp(x[0], low, high)


def _softmax_like(fn: Callable[[Tensor, int], Tensor]):
    def run(node: Node, x: Args) -> Tensor:
        data = x[0]
        if node.opset >= 13:
            return fn(data, node.attr("axis", -1))
        axis = node.attr("axis", 1) % max(data.dim(), 1)  # before opset 13: on the input flattened to 2-D at axis
        rows = math.prod(data.shape[:axis])
        return fn(data.reshape(rows, math.prod(data.shape[axis:])), 1).reshape(data.shape)
    return run


OPS["Softmax"] = _softmax_like(torch.softmax)
OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)


# convolution and pooling ---------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _torch_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    """Per-axis (begin, end) pads, first axis first, in F.pad's order (last axis first)."""
    return [p for begin_end in reversed(pads) for p in begin_end]


def spatial_pads(node: Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding of each spatial axis from ``pads`` or ``auto_pad`` (Conv and pooling)."""
    n = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return pads
    if auto_pad == "VALID":
        return [(0, 0)] * n
    flat = node.attr("pads", [0] * (2 * n))
    return list(zip(flat[:n], flat[n:]))


def _geometry(node: Node, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    """(strides, dilations), defaulting to ones."""
    n = len(kernel)
    return list(node.attr("strides", [1] * n)), list(node.attr("dilations", [1] * n))


@_op("Conv")
def _conv(node: Node, x: Args) -> Tensor:
    data, weight, bias = x[0], x[1], _opt(x, 2)
    kernel = list(weight.shape[2:])
    strides, dilations = _geometry(node, kernel)
    pads = spatial_pads(node, data.shape[2:], kernel, strides, dilations)
    padding: list[int] | int = [begin for begin, _ in pads]
    if any(begin != end for begin, end in pads):
        data, padding = F.pad(data, _torch_pad(pads)), 0
    return _CONV[len(kernel)](data, weight, bias, strides, padding, dilations, node.attr("group", 1))


@_op("ConvTranspose")
def _conv_transpose(node: Node, x: Args) -> Tensor:
    """Unpadded transposed conv, then output_padding added and pads cropped at each end. With output_shape or
    auto_pad, the crop is split as the ONNX spec says: the odd one at the end for SAME_UPPER, else at the start."""
    data, weight, bias = x[0], x[1], _opt(x, 2)
    kernel = list(weight.shape[2:])
    n = len(kernel)
    strides, dilations = _geometry(node, kernel)
    extra = node.attr("output_padding", [0] * n)
    full = [(i - 1) * s + (k - 1) * d + 1 + e
            for i, s, k, d, e in zip(data.shape[2:], strides, kernel, dilations, extra)]
    auto_pad, output_shape = node.attr("auto_pad", "NOTSET"), node.attr("output_shape")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = output_shape[-n:] if output_shape else [i * s for i, s in zip(data.shape[2:], strides)]
        totals = [max(0, f - t) for f, t in zip(full, target)]
        pads = [(t // 2, t - t // 2) if auto_pad == "SAME_UPPER" else (t - t // 2, t // 2) for t in totals]
    else:
        flat = node.attr("pads", [0] * (2 * n))
        pads = list(zip(flat[:n], flat[n:]))
    y = _CONV_TRANSPOSE[n](data, weight, None, strides, 0, 0, node.attr("group", 1), dilations)
    y = F.pad(y, _torch_pad([(-begin, e - end) for (begin, end), e in zip(pads, extra)]))
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * n)
    return y


def _pool_pads(node: Node, data: Tensor) -> tuple[list[int], list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """(kernel, strides, explicit pads, pads that make a padding-free floor-mode pool give ONNX's output size).

    The output size follows onnxruntime: floor or ceil of (size + pads - span) / stride + 1, and with ceil_mode
    a last window that would start beyond the input and its begin padding is dropped."""
    kernel = list(node.attr("kernel_shape"))
    strides, dilations = _geometry(node, kernel)
    explicit = spatial_pads(node, data.shape[2:], kernel, strides, dilations)
    ceil = node.attr("ceil_mode", 0)
    full = []
    for size, k, s, d, (begin, end) in zip(data.shape[2:], kernel, strides, dilations, explicit):
        span = (k - 1) * d + 1
        room = size + begin + end - span
        count = (-(-room // s) if ceil else room // s) + 1
        if ceil and (count - 1) * s >= size + begin:
            count -= 1
        full.append((begin, (count - 1) * s + span - size - begin))
    return kernel, strides, explicit, full


def _lowest(dtype: torch.dtype) -> float:
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


@_op("MaxPool")
def _max_pool(node: Node, x: Args) -> Tensor:
    kernel, strides, _, full = _pool_pads(node, x[0])
    data = F.pad(x[0], _torch_pad(full), value=_lowest(x[0].dtype))
    dilations = list(node.attr("dilations", [1] * len(kernel)))
    return _MAX_POOL[len(kernel)](data, kernel, strides, 0, dilations)


@_op("AveragePool")
def _average_pool(node: Node, x: Args) -> Tensor:
    """Window sums over the padded input divided by window counts: the input and, with count_include_pad,
    the explicit pads count; the room that ceil_mode adds beyond them never does."""
    kernel, strides, explicit, full = _pool_pads(node, x[0])
    n = len(kernel)
    dilations = list(node.attr("dilations", [1] * n))
    ones = torch.ones(x[0].shape[2:], dtype=x[0].dtype, device=x[0].device)
    mask = F.pad(ones, _torch_pad(explicit), value=float(node.attr("count_include_pad", 0)))
    mask = F.pad(mask, _torch_pad([(0, f - e) for (_, f), (_, e) in zip(full, explicit)]))
    data = F.pad(x[0], _torch_pad(full))
    window = torch.ones((1, 1, *kernel), dtype=x[0].dtype, device=x[0].device)
    batch, channels = data.shape[:2]
    sums = _CONV[n](data.reshape(batch * channels, 1, *data.shape[2:]), window, None, strides, 0, dilations)
    counts = _CONV[n](mask[None, None], window, None, strides, 0, dilations)
    return (sums / counts).reshape(batch, channels, *sums.shape[2:])


@_op("GlobalAveragePool")
def _global_average_pool(node: Node, x: Args) -> Tensor:
    return x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(node: Node, x: Args) -> Tensor:
    return x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)


@_op("Gemm")
def _gemm(node: Node, x: Args) -> Tensor:
    a, b, c = x[0], x[1], _opt(x, 2)
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is None:
        return y
    return y + (c if beta == 1.0 else beta * c)


@_op("Einsum")
def _einsum(node: Node, x: Args) -> Tensor:
    return torch.einsum(node.attr("equation"), *x)


# normalization -------------------------------------------------------------------------------------------------------

@_op("BatchNormalization")
def _batch_norm(node: Node, x: Args) -> Tensor:
    """Inference form, (x - mean) / sqrt(var + eps) * scale + bias, differentiable in all four tensors."""
    data, scale, bias, mean, var = x[:5]
    shape = (1, -1) + (1,) * (data.dim() - 2)
    eps = node.attr("epsilon", 1e-5)
    return (data - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) \
        + bias.reshape(shape)


CHECKS["BatchNormalization"] = lambda node: (
    "training_mode=1" if node.attr("training_mode", 0) else "training outputs" if any(node.outputs[1:]) else None)


@_op("LayerNormalization")
def _layer_norm(node: Node, x: Args) -> Tensor | tuple[Tensor, ...]:
    data, scale, bias = x[0], x[1], _opt(x, 2)
    axis = node.attr("axis", -1) % data.dim()
    eps = node.attr("epsilon", 1e-5)
    shape = data.shape[axis:]
    y = F.layer_norm(data, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)
    if not any(node.outputs[1:]):
        return y
    dims = tuple(range(axis, data.dim()))
    mean = data.mean(dims, keepdim=True)
    return y, mean, torch.rsqrt(((data - mean) ** 2).mean(dims, keepdim=True) + eps)


@_op("InstanceNormalization")
def _instance_norm(node: Node, x: Args) -> Tensor:
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=node.attr("epsilon", 1e-5))


@_op("LRN")
def _lrn(node: Node, x: Args) -> Tensor:
    """Sum of squares over channels c - floor((size-1)/2) .. c + ceil((size-1)/2), as ONNX defines it."""
    data = x[0]
    size = node.attr("size")
    squares = (data * data).reshape(data.shape[0], 1, data.shape[1], -1)
    squares = F.pad(squares, (0, 0, (size - 1) // 2, size // 2))
    sums = F.avg_pool2d(squares, (size, 1), stride=1) * size
    scale = node.attr("bias", 1.0) + node.attr("alpha", 1e-4) / size * sums.reshape(data.shape)
    return data / scale ** node.attr("beta", 0.75)


# reductions ----------------------------------------------------------------------------------------------------------

def _prod(data: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted((d % data.dim() for d in dims), reverse=True):
        data = data.prod(d, keepdim=keep)
    return data


_REDUCERS: dict[str, Callable[[Tensor, tuple[int, ...], bool], Tensor]] = {
    "ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin,
    "ReduceProd": _prod,
    "ReduceL1": lambda t, d, k: torch.linalg.vector_norm(t, 1, d, k),
    "ReduceL2": lambda t, d, k: torch.linalg.vector_norm(t, 2, d, k),
    "ReduceSumSquare": lambda t, d, k: torch.sum(t * t, d, k),
    "ReduceLogSumExp": torch.logsumexp,
    "ReduceLogSum": lambda t, d, k: torch.log(torch.sum(t, d, k)),
}


def _reduce(node: Node, x: Args) -> Tensor:
    since = 13 if node.op == "ReduceSum" else 18  # axes: an attribute before, an optional input from then on
    axes = _axes_arg(node, x, since)
    data = x[0]
    if not axes:
        if node.opset >= since and node.attr("noop_with_empty_axes", 0):
            return data
        axes = list(range(data.dim()))
    if data.dim() == 0:
        return data
    return _REDUCERS[node.op](data, tuple(axes), bool(node.attr("keepdims", 1)))


OPS.update(dict.fromkeys(_REDUCERS, _reduce))


def _arg_extreme(fn: Callable[..., Tensor]):
    def run(node: Node, x: Args) -> Tensor:
        data, axis, keep = x[0], node.attr("axis", 0) % max(x[0].dim(), 1), bool(node.attr("keepdims", 1))
        if not node.attr("select_last_index", 0):
            return fn(data, axis, keep)
        return data.shape[axis] - 1 - fn(data.flip(axis), axis, keep)
    return run


OPS["ArgMax"] = _arg_extreme(torch.argmax)
OPS["ArgMin"] = _arg_extreme(torch.argmin)


# shapes and indexing -------------------------------------------------------------------------------------------------

@_op("Shape")
def _shape(node: Node, x: Args) -> Tensor:
    shape = torch.tensor(tuple(x[0].shape), dtype=torch.int64, device=x[0].device)
    return shape[node.attr("start", 0):node.attr("end")]


@_op("Size")
def _size(node: Node, x: Args) -> Tensor:
    return torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)


@_op("Flatten")
def _flatten(node: Node, x: Args) -> Tensor:
    data = x[0]
    axis = node.attr("axis", 1)
    axis = axis + data.dim() if axis < 0 else axis
    return data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))


@_op("Reshape")
def _reshape(node: Node, x: Args) -> Tensor:
    data = x[0]
    shape = _ints(x[1]) if len(x) > 1 else node.attr("shape")  # an attribute before opset 5
    if not node.attr("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


@_op("Transpose")
def _transpose(node: Node, x: Args) -> Tensor:
    return x[0].permute(node.attr("perm", list(range(x[0].dim()))[::-1]))


@_op("Squeeze")
def _squeeze(node: Node, x: Args) -> Tensor:
    axes = _axes_arg(node, x, 13)
    return x[0].squeeze() if not axes else x[0].squeeze(tuple(axes))


@_op("Unsqueeze")
def _unsqueeze(node: Node, x: Args) -> Tensor:
    axes = _axes_arg(node, x, 13)
    data = x[0]
    for axis in sorted(a % (data.dim() + len(axes)) for a in axes):
        data = data.unsqueeze(axis)
    return data


@_op("Concat")
def _concat(node: Node, x: Args) -> Tensor:
    return torch.cat(x, dim=node.attr("axis"))


@_op("Split")
def _split(node: Node, x: Args) -> Sequence[Tensor]:
    data, axis = x[0], node.attr("axis", 0)
    sizes = _axes_arg(node, x, 13, name="split")
    if not sizes:
        dim = data.shape[axis]
        parts = node.attr("num_outputs", len(node.outputs))
        if node.attr("num_outputs") is None:
            sizes = [dim // parts] * parts
        else:  # opset 18: the last chunk is smaller when the axis does not divide evenly
            chunk = -(-dim // parts)
            sizes = [max(0, min(chunk, dim - i * chunk)) for i in range(parts)]
    return torch.split(data, sizes, axis)


_END_OF_AXIS = (2**31 - 1, 2**63 - 1)


@_op("Slice")
def _slice(node: Node, x: Args) -> Tensor:
    data = x[0]
    if node.opset < 10:
        starts, ends, axes, steps = node.attr("starts"), node.attr("ends"), node.attr("axes"), None
    else:
        starts, ends, axes, steps = _ints(x[1]), _ints(x[2]), _ints(_opt(x, 3)), _ints(_opt(x, 4))
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    backwards = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= data.dim()
        dim = data.shape[axis]
        start, end = (start + dim if start < 0 else start), (end + dim if end < 0 else end)
        if end in _END_OF_AXIS:  # as in onnxruntime: to the end that the step walks to
            end = dim if step > 0 else -1
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:  # torch has no negative steps: gather the indices
            picked = range(min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step)
            backwards.append((axis, torch.tensor(picked, dtype=torch.int64, device=data.device)))
    data = data[tuple(index)]
    for axis, indices in backwards:
        data = data.index_select(axis, indices)
    return data


def _positive(indices: Tensor, dim: int) -> Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + dim, indices)


@_op("Gather")
def _gather(node: Node, x: Args) -> Tensor:
    data = x[0]
    axis = node.attr("axis", 0) % data.dim()
    indices = _positive(x[1], data.shape[axis])
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])


@_op("GatherElements")
def _gather_elements(node: Node, x: Args) -> Tensor:
    axis = node.attr("axis", 0) % x[0].dim()
    return torch.gather(x[0], axis, _positive(x[1], x[0].shape[axis]))


@_op("Expand")
def _expand(node: Node, x: Args) -> Tensor:
    return x[0].expand(torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]))))


@_op("Tile")
def _tile(node: Node, x: Args) -> Tensor:
    return x[0].repeat(_ints(x[1]))


@_op("ConstantOfShape")
def _constant_of_shape(node: Node, x: Args) -> Tensor:
    value = node.attr("value")
    value = torch.zeros(1) if value is None else value
    return torch.full(_ints(x[0]), value.reshape(-1)[0].item(), dtype=value.dtype, device=x[0].device)


@_op("Range")
def _range(node: Node, x: Args) -> Tensor:
    start, limit, delta = (t.reshape(()).item() for t in x[:3])
    return torch.arange(start, limit, delta, dtype=x[0].dtype, device=x[0].device)


@_op("Cast")
def _cast(node: Node, x: Args) -> Tensor:
    return x[0].to(TORCH_DTYPES[node.attr("to")])


CHECKS["Cast"] = lambda node: (
    None if node.attr("to") in TORCH_DTYPES else f"to={TensorProto.DataType.Name(node.attr('to'))}")


@_op("CastLike")
def _cast_like(node: Node, x: Args) -> Tensor:
    return x[0].to(x[1].dtype)


@_op("Dropout")
def _dropout(node: Node, x: Args) -> tuple[Tensor, ...]:
    """Always the identity (inference semantics); the mask, if asked for, is all true."""
    if not any(node.outputs[1:]):
        return (x[0],)
    return x[0], torch.ones_like(x[0], dtype=torch.bool)


@_op("NonZero")
def _non_zero(node: Node, x: Args) -> Tensor:
    return torch.nonzero(x[0]).t()


@_op("Pad")
def _pad(node: Node, x: Args) -> Tensor:
    data = x[0]
    rank = data.dim()
    if node.opset < 11:
        pads, value, axes = node.attr("pads"), node.attr("value", 0.0), None
    else:
        pads, value, axes = _ints(x[1]), _opt(x, 2), _ints(_opt(x, 3))
    axes = [a % rank for a in axes] if axes else list(range(rank))
    per_axis = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        per_axis[axis] = (pads[i], pads[i + len(axes)])
    first = next((i for i, p in enumerate(per_axis) if p != (0, 0)), rank)
    if first == rank:
        return data
    flat = _torch_pad(per_axis[first:])
    mode = node.attr("mode", "constant")
    if mode == "constant":
        if isinstance(value, Tensor) and value.requires_grad:  # a trained pad value: keep its gradient
            border = F.pad(torch.zeros_like(data), flat, value=1.0)
            return F.pad(data, flat) + border * value.reshape(())
        return F.pad(data, flat, value=value.item() if isinstance(value, Tensor) else value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    trailing = data.shape[first:]
    if len(trailing) > 3:
        raise OnnxPruneError(f"Pad {node.name!r}: mode {mode} on more than the last 3 axes is not supported")
    padded = F.pad(data.reshape(1, -1, *trailing), flat, mode=torch_mode)
    return padded.reshape(*data.shape[:first], *padded.shape[2:])


CHECKS["Pad"] = lambda node: (
    None if node.attr("mode", "constant") in ("constant", "reflect", "edge", "wrap") else f"mode={node.attr('mode')}")


# resize (nearest only) -----------------------------------------------------------------------------------------------

def nearest_indices(size: int, out: int, scale: float, coordinates: str, rounding: str, device) -> Tensor:
    """Source index of each output position along one axis of a nearest-neighbour Resize (ONNX formulas)."""
    o = torch.arange(out, dtype=torch.float32, device=device)
    if coordinates == "asymmetric":
        src = o / scale
    elif coordinates == "align_corners":
        src = o * (size - 1) / (out - 1) if out > 1 else torch.zeros_like(o)
    elif coordinates == "pytorch_half_pixel":
        src = (o + 0.5) / scale - 0.5 if out > 1 else torch.zeros_like(o)
    elif coordinates == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        src = size / 2 * (1 - adjustment) + (o + 0.5) / scale - 0.5
    else:  # half_pixel
        src = (o + 0.5) / scale - 0.5
    half = src - torch.floor(src) == 0.5
    if rounding == "floor":
        index = torch.floor(src)
    elif rounding == "ceil":
        index = torch.ceil(src)
    elif rounding == "round_prefer_ceil":
        index = torch.where(half, torch.ceil(src), torch.round(src))
    else:  # round_prefer_floor
        index = torch.where(half, torch.floor(src), torch.round(src))
    return index.clamp(0, size - 1).long()


@_op("Resize", "Upsample")
def _resize(node: Node, x: Args) -> Tensor:
    data = x[0]
    rank = data.dim()
    legacy = node.op == "Upsample" or node.opset < 11
    if legacy:  # Upsample and opset-10 Resize: asymmetric coordinates, onnxruntime's "simple" rounding
        scales = x[1].tolist() if len(x) > 1 else node.attr("scales")
        sizes, axes = None, None
    else:
        scales, sizes, axes = _opt(x, 2), _ints(_opt(x, 3)), node.attr("axes")
        scales = scales.tolist() if scales is not None and scales.numel() else None
    axes = [a % rank for a in axes] if axes else list(range(rank))
    for i, axis in enumerate(axes):
        size = data.shape[axis]
        out = sizes[i] if sizes else int(math.floor(size * scales[i]))
        scale = out / size if sizes else scales[i]
        if out == size and scale == 1.0:
            continue
        if legacy:
            coordinates, rounding = "asymmetric", "ceil" if scale < 1 else "floor"
        else:
            coordinates = node.attr("coordinate_transformation_mode", "half_pixel")
            rounding = node.attr("nearest_mode", "round_prefer_floor")
        data = data.index_select(axis, nearest_indices(size, out, scale, coordinates, rounding, data.device))
    return data


def _check_resize(node: Node) -> str | None:
    if node.attr("mode", "nearest") != "nearest":
        return f"mode={node.attr('mode')}"
    if node.attr("coordinate_transformation_mode") == "tf_crop_and_resize":
        return "coordinate_transformation_mode=tf_crop_and_resize"
    if node.attr("antialias", 0):
        return "antialias=1"
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy={node.attr('keep_aspect_ratio_policy')}"
    return None


CHECKS["Resize"] = CHECKS["Upsample"] = _check_resize
CHECKS["MaxPool"] = lambda node: "indices output" if any(node.outputs[1:]) else None


# --------------------------------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------------------------------

def _sanitise(name: str, taken: set[str], reserved: object) -> str:
    """A key for ``name`` that is a valid, unused attribute name of ``reserved``'s kind."""
    base = re.sub(r"\W", "_", name) or "_"
    key, n = base, 1
    while key in taken or hasattr(reserved, key):
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def needed_nodes(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[int]:
    """Indices of the nodes that the tensors ``outputs`` depend on."""
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    needed: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(producer[name] for name in nodes[i].input if name in producer)
    return sorted(needed)


def topological_order(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[int]:
    """Indices of ``nodes`` in an order where every input is produced before it is read (file order on ties)."""
    waiting = {i: {name for name in node.input if name and name not in available} for i, node in enumerate(nodes)}
    consumers: dict[str, list[int]] = {}
    for i, missing in waiting.items():
        for name in missing:
            consumers.setdefault(name, []).append(i)
    ready = [i for i, missing in waiting.items() if not missing]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for name in nodes[i].output:
            for j in consumers.pop(name, []):
                waiting[j].discard(name)
                if not waiting[j]:
                    heapq.heappush(ready, j)
    if len(order) < len(nodes):
        stuck = min(set(range(len(nodes))) - set(order))
        raise OnnxPruneError(f"node {nodes[stuck].name or nodes[stuck].op_type!r} reads {min(waiting[stuck])!r}, "
                             f"which nothing before it produces (a cycle or a missing tensor)")
    return order


def unsupported_message(nodes: Sequence[Node]) -> str | None:
    """One line naming every unsupported op type (or variant) with its node count and first node, or None."""
    found: Counter[str] = Counter()
    first: dict[str, str] = {}
    for node in nodes:
        if node.domain not in _DEFAULT_DOMAINS:
            kind = f"{node.domain}:{node.op}"
        elif node.op not in OPS:
            kind = node.op
        else:
            reason = CHECKS[node.op](node) if node.op in CHECKS else None
            kind = f"{node.op}({reason})" if reason else None
        if kind:
            found[kind] += 1
            first.setdefault(kind, node.name)
    if not found:
        return None
    parts = [f"{kind} ({count} node{'s' * (count > 1)}, first {first[kind]!r})" for kind, count in found.items()]
    return "cannot train this graph, unsupported operators: " + ", ".join(parts)


class GraphModule(nn.Module):
    """A torch module that computes what an ONNX graph computes, with its float weights as parameters.

    ``outputs`` names the tensors that ``forward`` returns (default: the graph outputs, in order); it may name any
    intermediate tensor, such as the feature map before global pooling. Only the nodes those tensors need are run.
    """

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str] | None = None) -> None:
        super().__init__()
        graph = model.graph
        opset = default_opset(model)
        self.output_names = list(outputs) if outputs is not None else [o.name for o in graph.output]
        self.params = nn.ParameterDict()
        self.constants = nn.Module()
        self._param_keys: dict[str, str] = {}
        self._param_dtypes: dict[str, torch.dtype] = {}
        self._constant_keys: dict[str, str] = {}
        self._param_taken: set[str] = set()
        self._constant_taken: set[str] = set()

        unusable, bad_constants = self._load_values(graph)
        values = set(self._param_keys) | set(self._constant_keys) | unusable
        self.input_dtypes = {i.name: TORCH_DTYPES.get(i.type.tensor_type.elem_type) for i in graph.input
                             if i.name not in values}
        computed = [n for n in graph.node if not (n.op_type == "Constant" and n.domain in _DEFAULT_DOMAINS)]
        computed += bad_constants  # reported as unsupported below

        known = values | set(self.input_dtypes) | {name for n in computed for name in n.output}
        for name in self.output_names:
            if name not in known:
                raise OnnxPruneError(f"no tensor named {name!r} in the graph")
        picked = [computed[i] for i in needed_nodes(computed, self.output_names)]
        wanted = {name for n in picked for name in n.input} | set(self.output_names)
        plan = [Node(n.op_type, n.domain, n.name or n.output[0], tuple(n.input),
                     tuple(name if name in wanted else "" for name in n.output),
                     {a.name: _attribute_value(a) for a in n.attribute}, opset)
                for n in picked]
        message = unsupported_message(plan)
        if message:
            raise UnsupportedOperators(message)
        if wanted & unusable:
            name = min(wanted & unusable)
            raise OnnxPruneError(f"initializer {name!r} has a type that torch cannot hold")
        order = topological_order(picked, values | set(self.input_dtypes))
        self._plan = [plan[i] for i in order]
        self._sources = sorted(name for name in wanted if name in values)
        self._inputs = [name for name in self.input_dtypes if name in wanted]
        self._release = self._release_schedule()
        # Extension points for gated training (docs/algorithms.md section 5): a tensor named in ``tensor_transforms``
        # is replaced by ``fn(tensor)`` as soon as its node produces it; ``bypass`` turns nodes into pass-throughs and
        # drops the nodes nothing needs any more. ``nodes_evaluated`` counts the nodes run, over all forward passes.
        self.tensor_transforms: dict[str, Callable[[Tensor], Tensor]] = {}
        self._bypassed: dict[str, str] = {}
        self._steps = list(zip(self._plan, self._release))
        self.nodes_evaluated = 0

    def _load_values(self, graph: onnx.GraphProto) -> tuple[set[str], list[onnx.NodeProto]]:
        """Register the initializers and Constant-node tensors as parameters or buffers. Returns the names of
        initializers torch cannot hold (strings and the like) and the Constant nodes it cannot hold."""
        unusable = {t.name for t in graph.initializer if t.data_type not in TORCH_DTYPES}
        for proto in graph.initializer:
            if proto.name not in unusable:
                self._add_value(proto.name, tensor_to_torch(proto), is_parameter(proto, in_constant_node=False))
        bad_constants = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                value = _constant_node_value(node)
                if value is None:
                    bad_constants.append(node)
                    continue
                attribute = node.attribute[0]
                self._add_value(node.output[0], value,
                                attribute.name == "value" and is_parameter(attribute.t, in_constant_node=True))
        return unusable, bad_constants

    def _add_value(self, name: str, value: Tensor, parameter: bool) -> None:
        if parameter:
            key = _sanitise(name, self._param_taken, self.params)
            self.params[key] = nn.Parameter(value.float())
            self._param_keys[name], self._param_dtypes[name] = key, value.dtype
        else:
            key = _sanitise(name, self._constant_taken, self.constants)
            self.constants.register_buffer(key, value, persistent=False)
            self._constant_keys[name] = key

    def _release_schedule(self, plan: Sequence[Node] | None = None) -> list[tuple[str, ...]]:
        """For each step of the plan (default: the whole plan), the tensors read for the last time there (dropped
        to save memory)."""
        plan = self._plan if plan is None else plan
        last: dict[str, int] = {}
        for step, node in enumerate(plan):
            for name in node.inputs:
                last[name] = step
        keep = set(self.output_names)
        schedule: list[list[str]] = [[] for _ in plan]
        for name, step in last.items():
            if name and name not in keep:
                schedule[step].append(name)
        return [tuple(names) for names in schedule]

    def bypass(self, passes: Mapping[str, str]) -> None:
        """Make each node named in ``passes`` (node name -> one of its input tensors) hand on that input instead of
        computing its output, as a removed residual block's join hands on the shortcut. From then on, the nodes
        whose outputs nothing needs any more (the block's branch) are not evaluated at all: neither forward nor
        backward. Accumulates over calls; ``active_nodes`` says how many nodes a forward pass runs."""
        nodes = {node.name: node for node in self._plan}
        for name, tensor in passes.items():
            node = nodes.get(name)
            if node is None:
                raise OnnxPruneError(f"no node named {name!r} is evaluated by this module")
            if tensor not in node.inputs or sum(1 for o in node.outputs if o) != 1:
                raise OnnxPruneError(f"node {name!r} cannot hand on {tensor!r}: not one of its inputs, or it has "
                                     f"several outputs")
        self._bypassed.update(passes)
        plan = [dataclasses.replace(node, op="Identity", inputs=(self._bypassed[node.name],))
                if node.name in self._bypassed else node for node in self._plan]
        needed, live = set(self.output_names), []
        for node in reversed(plan):
            if any(name in needed for name in node.outputs if name):
                live.append(node)
                needed.update(name for name in node.inputs if name)
        live.reverse()
        self._steps = list(zip(live, self._release_schedule(live)))

    def node_named(self, name: str) -> Node | None:
        """The node of the plan named ``name`` (the ONNX node's name, else its first output), or None."""
        return next((node for node in self._plan if node.name == name), None)

    @property
    def active_nodes(self) -> int:
        """How many nodes one forward pass evaluates (fewer once ``bypass`` has cut branches off)."""
        return len(self._steps)

    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """ONNX tensor name -> its parameter (float32; written back in the tensor's own dtype)."""
        return {name: self.params[key] for name, key in self._param_keys.items()}

    def _value(self, name: str) -> Tensor:
        if name in self._param_keys:
            value = self.params[self._param_keys[name]]
            dtype = self._param_dtypes[name]
            return value if dtype == torch.float32 else value.to(dtype)
        return getattr(self.constants, self._constant_keys[name])

    def _feed(self, feeds: Mapping[str, Tensor], name: str) -> Tensor:
        if name not in feeds:
            raise OnnxPruneError(f"missing input {name!r} (the graph reads {', '.join(self.input_dtypes)})")
        value = torch.as_tensor(feeds[name])
        dtype = self.input_dtypes[name]
        return value if dtype is None or value.dtype == dtype else value.to(dtype)

    def forward(self, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        """Graph input name -> tensor (or array; cast to the input's dtype) in; the ``outputs`` tensors out, in
        order."""
        env: dict[str, Tensor] = {name: self._value(name) for name in self._sources}
        for name in self._inputs:
            env[name] = self._feed(feeds, name)
        transforms = self.tensor_transforms
        for node, release in self._steps:
            args = [env[name] if name else None for name in node.inputs]
            result = OPS[node.op](node, args)
            results = (result,) if isinstance(result, Tensor) else result
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value if name not in transforms else transforms[name](value)
            for name in release:
                env.pop(name, None)
        self.nodes_evaluated += len(self._steps)
        return [env[name] for name in self.output_names]


# --------------------------------------------------------------------------------------------------------------------
# write-back
# --------------------------------------------------------------------------------------------------------------------

def _named_tensors(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Initializers and the tensors of Constant nodes (attribute ``value``), by tensor name."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality of two float32 tensors (so -0.0 != 0.0 and a NaN equals itself)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _store(proto: TensorProto, value: Tensor) -> None:
    """Replace the data of ``proto`` by ``value`` (already in its dtype), as little-endian raw data."""
    for name in ("float_data", "double_data", "int32_data", "int64_data", "uint64_data", "raw_data"):
        proto.ClearField(name)
    proto.raw_data = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_back(model: onnx.ModelProto, module: GraphModule) -> onnx.ModelProto:
    """A copy of ``model`` with each parameter's current value in its initializer or Constant node, in the tensor's
    own dtype; names, structure and metadata unchanged, and a tensor whose value did not change keeps its bytes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    tensors = _named_tensors(result.graph)
    for name, parameter in module.onnx_parameters().items():
        proto = tensors.get(name)
        if proto is None:
            raise OnnxPruneError(f"parameter {name!r} is not a tensor of this model")
        original = tensor_to_torch(proto)
        value = parameter.detach().cpu().float()
        if tuple(original.shape) != tuple(value.shape):
            raise OnnxPruneError(f"parameter {name!r} has shape {tuple(value.shape)}, the model's tensor "
                                 f"{tuple(original.shape)}")
        if not same_bits(value, original.float()):
            _store(proto, value.to(original.dtype))
    return result
