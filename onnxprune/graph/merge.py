"""Kernel algebra for merging a run of convolutions into one (LayerMerge, Kim et al., ICML 2024, section 3;
docs/algorithms.md section 4). Pure numpy, float64.

A ``LinearMap`` says how a tensor inside a run is computed from the run's input x, per spatial
axis: ``y[c, i] = b[c] + sum_{c', t} W[c, c', t] * x[c', i * stride + start + t]`` (x is zero
outside its extent). Composing a conv after a map, and adding two maps (a residual join), stay in
this form; the final map is the merged conv with ``pads_begin = -start``.

Composition is exact away from the borders. Within a band as wide as the later convs' padding it
differs, because the original zero-pads each intermediate map while the merged conv pads only x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearMap:
    """A linear map with bias; ``weight`` is (Cout, Cin, *k) dense, or (C, *k) when ``depthwise``."""

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, ...]
    start: tuple[int, ...]
    depthwise: bool

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight.shape[1:] if self.depthwise else self.weight.shape[2:]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def dense(self) -> np.ndarray:
        """(Cout, Cin, *k) form of the weight."""
        if not self.depthwise:
            return self.weight
        c = self.weight.shape[0]
        out = np.zeros((c, c, *self.kernel))
        out[np.arange(c), np.arange(c)] = self.weight
        return out


def identity_map(channels: int, spatial: int = 2) -> LinearMap:
    return LinearMap(np.ones((channels,) + (1,) * spatial), np.zeros(channels), (1,) * spatial, (0,) * spatial, True)


def conv_map(weight: np.ndarray, bias: np.ndarray | None, stride, pads_begin, groups: int) -> LinearMap:
    """The map of one conv (weight (Cout, Cin/groups, *k)), depthwise kept as such, groups made dense."""
    weight = np.asarray(weight, np.float64)
    cout, cin_g = weight.shape[:2]
    b = np.zeros(cout) if bias is None else np.asarray(bias, np.float64)
    stride, start = tuple(int(s) for s in stride), tuple(-int(p) for p in pads_begin)
    if groups > 1 and cin_g == 1 and groups == cout:
        return LinearMap(weight[:, 0], b, stride, start, True)
    if groups > 1:
        cin = cin_g * groups
        dense = np.zeros((cout, cin, *weight.shape[2:]))
        per = cout // groups
        for g in range(groups):
            dense[g * per:(g + 1) * per, g * cin_g:(g + 1) * cin_g] = weight[g * per:(g + 1) * per]
        weight = dense
    return LinearMap(weight, b, stride, start, False)


def compose(first: LinearMap, second: LinearMap) -> LinearMap:
    """``second`` applied to the output of ``first`` (second is a single conv's map)."""
    s1, k1, k2 = first.stride, first.kernel, second.kernel
    kernel = tuple((b - 1) * s + a for a, b, s in zip(k1, k2, s1))
    stride = tuple(a * b for a, b in zip(s1, second.stride))
    start = tuple(o1 + o2 * s for o1, o2, s in zip(first.start, second.start, s1))
    w2_sum = second.weight.sum(axis=tuple(range(1 if second.depthwise else 2, second.weight.ndim)))
    bias = second.bias + (w2_sum * first.bias if second.depthwise else w2_sum @ first.bias)
    depthwise = first.depthwise and second.depthwise
    if depthwise:
        weight = np.zeros((first.out_channels, *kernel))
    else:
        cin = first.weight.shape[0] if first.depthwise else first.weight.shape[1]
        weight = np.zeros((second.out_channels, cin, *kernel))
    for v in np.ndindex(*k2):
        window = tuple(slice(vi * s, vi * s + a) for vi, s, a in zip(v, s1, k1))
        if depthwise:
            weight[(slice(None),) + window] += second.weight[(slice(None),) + v][:, None, None] * first.weight
        elif second.depthwise:  # first is dense: scale its output channels
            weight[(slice(None), slice(None)) + window] += second.weight[(slice(None),) + v][:, None, None, None] * first.weight
        elif first.depthwise:  # second is dense: scale its input channels
            w2 = second.weight[(slice(None), slice(None)) + v]
            weight[(slice(None), slice(None)) + window] += w2[:, :, None, None] * first.weight[None]
        else:
            w2 = second.weight[(slice(None), slice(None)) + v]
            weight[(slice(None), slice(None)) + window] += np.tensordot(w2, first.weight, axes=(1, 0))
    return LinearMap(weight, bias, stride, start, depthwise)


def add(a: LinearMap, b: LinearMap) -> LinearMap:
    """The map of ``a + b`` (a residual join inside a run). Needs the same stride and channels."""
    if a.stride != b.stride or a.out_channels != b.out_channels:
        raise ValueError("cannot add maps with different strides or channel counts")
    start = tuple(min(x, y) for x, y in zip(a.start, b.start))
    end = tuple(max(x + kx, y + ky) for x, kx, y, ky in zip(a.start, a.kernel, b.start, b.kernel))
    kernel = tuple(e - s for s, e in zip(start, end))
    depthwise = a.depthwise and b.depthwise
    if depthwise:
        weight = np.zeros((a.out_channels, *kernel))
    else:
        cin = (a.dense() if a.depthwise else a.weight).shape[1]
        weight = np.zeros((a.out_channels, cin, *kernel))
    for m in (a, b):
        w = m.weight if depthwise else m.dense()
        lead = (slice(None),) if depthwise else (slice(None), slice(None))
        window = tuple(slice(o - s, o - s + k) for o, s, k in zip(m.start, start, m.kernel))
        weight[lead + window] += w
    return LinearMap(weight, a.bias + b.bias, a.stride, start, depthwise)


def to_conv(m: LinearMap, in_size: tuple[int, ...], out_size: tuple[int, ...], dtype=np.float32) -> dict:
    """Weight, bias and attributes of the single conv equal to ``m`` that maps ``in_size`` to ``out_size``.

    Raises ValueError when the merged conv would need negative padding.
    """
    pads_begin = tuple(-s for s in m.start)
    # The end padding that makes floor((i + p_begin + p_end - k) / stride) + 1 == o; a stride leaves
    # up to stride - 1 input rows unread, so a slightly negative need is met by 0.
    needed = [(o - 1) * st + k - i - p for o, st, k, i, p in zip(out_size, m.stride, m.kernel, in_size, pads_begin)]
    pads_end = tuple(0 if -st < n < 0 else n for n, st in zip(needed, m.stride))
    if any(p < 0 for p in pads_begin + pads_end):
        raise ValueError(f"the merged conv would need negative padding {pads_begin + pads_end}")
    weight = m.weight[:, None] if m.depthwise else m.weight
    return {
        "weight": weight.astype(dtype),
        "bias": m.bias.astype(dtype),
        "kernel_shape": list(m.kernel),
        "strides": list(m.stride),
        "pads": list(pads_begin + pads_end),
        "group": m.out_channels if m.depthwise else 1,
    }
