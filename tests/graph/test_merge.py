"""Merging conv runs: the composed conv equals the convs in sequence away from the borders
(float64 reference with torch), and differs only in the band that the later convs' padding explains."""

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from onnxprune.graph import merge


@st.composite
def conv_runs(draw):
    channels = draw(st.sampled_from([2, 4, 6]))
    depthwise_all = draw(st.booleans())
    n = draw(st.integers(1, 3))
    convs = []
    strided = False
    for i in range(n):
        k = 1 if strided else draw(st.sampled_from([1, 3, 5]))
        stride = draw(st.sampled_from([1, 2])) if not strided and i < n else 1
        strided = strided or stride > 1
        depthwise = depthwise_all or draw(st.booleans())
        cout = channels if depthwise else draw(st.sampled_from([channels, 2 * channels]))
        groups = channels if depthwise else 1
        convs.append(dict(k=k, stride=stride, groups=groups, cin=channels, cout=cout, bias=draw(st.booleans())))
        channels = cout
    return convs, draw(st.booleans()), draw(st.integers(0, 2**16))


def run_reference(x, convs, params):
    y = x
    for c, (w, b) in zip(convs, params):
        y = F.conv2d(y, w, b, stride=c["stride"], padding=c["k"] // 2, groups=c["groups"])
    return y


@settings(max_examples=60, deadline=None)
@given(conv_runs())
def test_merged_conv_equals_the_sequence_in_the_interior(case):
    convs, add_identity, seed = case
    rng = np.random.default_rng(seed)
    params = []
    m = None
    for c in convs:
        w = rng.normal(size=(c["cout"], c["cin"] // c["groups"], c["k"], c["k"]))
        b = rng.normal(size=c["cout"]) if c["bias"] else None
        params.append((torch.tensor(w), None if b is None else torch.tensor(b)))
        cm = merge.conv_map(w, b, (c["stride"],) * 2, (c["k"] // 2,) * 2, c["groups"])
        m = cm if m is None else merge.compose(m, cm)
    if m is None:
        return
    size = 24
    x = torch.tensor(rng.normal(size=(1, convs[0]["cin"], size, size)))
    ref = run_reference(x, convs, params)
    identity_ok = add_identity and m.stride == (1, 1) and m.out_channels == convs[0]["cin"]
    if identity_ok:
        m = merge.add(merge.identity_map(convs[0]["cin"]), m)
        ref = ref + x
    attrs = merge.to_conv(m, (size, size), tuple(ref.shape[2:]), np.float64)
    assert attrs["group"] == (m.out_channels if all(c["groups"] > 1 for c in convs) else 1)
    assert attrs["kernel_shape"][0] == 1 + sum((c["k"] - 1) for c in convs) or m.stride != (1, 1)
    out = F.conv2d(
        F.pad(x, (attrs["pads"][1], attrs["pads"][3], attrs["pads"][0], attrs["pads"][2])),
        torch.tensor(attrs["weight"]), torch.tensor(attrs["bias"]), stride=attrs["strides"], groups=attrs["group"])
    assert out.shape == ref.shape
    # The border band: each later conv zero-pads its input, which the merged conv cannot see.
    band_in = sum(c["k"] // 2 for c in convs[1:])
    band = -(-band_in // int(np.prod([c["stride"] for c in convs])))
    interior = (slice(None), slice(None), slice(band, out.shape[2] - band), slice(band, out.shape[3] - band))
    diff = (out - ref)[interior].abs().max().item() if out[interior].numel() else 0.0
    assert diff <= 1e-9 * max(1.0, ref.abs().max().item())
    if band == 0:
        assert (out - ref).abs().max().item() <= 1e-9 * max(1.0, ref.abs().max().item())


def test_float32_merge_error_is_below_1e_5_relative():
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(8, 8, 3, 3)), rng.normal(size=(8, 8, 1, 1))
    m = merge.compose(merge.conv_map(w1, None, (1, 1), (1, 1), 1), merge.conv_map(w2, None, (1, 1), (0, 0), 1))
    attrs = merge.to_conv(m, (10, 10), (10, 10))
    assert attrs["weight"].dtype == np.float32
    x = torch.tensor(rng.normal(size=(2, 8, 10, 10)))
    ref = F.conv2d(F.conv2d(x, torch.tensor(w1), padding=1), torch.tensor(w2))
    out = F.conv2d(x.float(), torch.tensor(attrs["weight"]), torch.tensor(attrs["bias"]), padding=1).double()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5  # 1x1 adds no padding: exact everywhere
