"""graph/rules.py against the rewrite it speaks for, on random conv chains.

Random chains vary the kernel (1, 3, 5, sometimes 2 or 4, sometimes not square), stride, dilation, padding
(explicit same-size pads, zero pads, asymmetric pads, auto_pad SAME_UPPER and VALID), groups (dense, depthwise,
grouped, depthwise with a channel multiplier), 1-D and 2-D convs, the activation after each conv (Relu,
Clip(0, 6), LeakyRelu, none), identity residual blocks x + f(x) over a few convs (nested sometimes, the
activation before or after the join), and tensors read off the path (a second graph output, or a ReduceMean
over the channels read as one). Each network is a ``Net`` spec, built with onnx.helper; the same spec builds
the reference of an option (convs dropped, activations dropped, blocks removed) with the same weights.

Properties:

1. every option ``enumerate_options`` offers applies alone through ``apply_plan``, and the conv it leaves has the
   kernel, stride and groups the option announced (the latency table is read with them);
2. its output equals its definition on random input (onnxruntime, float32): the network with the option's
   convs replaced by identities (the reference is built without them), its activations removed, its block's
   branch removed. A merge (and a folded identity, conv(x) + x) is exact only in the interior: every output
   position whose receptive field reaches the zero padding of a map inside the merged run (padding the
   merged conv does not see) is left out of the comparison. That mask is computed exactly, per axis, by
   propagating the taint through the reference network (``Net.taint``): the border band of
   docs/algorithms.md 4.2, as narrow as it can be (a later conv without padding adds none), carried through
   the convs after the run;
3. for chains of at most 4 convs, every segment and every subset of its convs to keep (the others dropped) is
   tried by brute force against ``segment_refusal``: what it accepts applies and matches its definition; what
   it refuses is never offered, and is a PlanError from ``apply_plan`` (never an error from deep inside),
   except where the refused plan is not one conv (a join or a read stays beside it) or holds a whole block
   (left out of the search space by choice): those apply and match, or (the latter) are PlanErrors;
4. named refusals (a merge across a dilated, SAME-padded or 1-D conv, across a tensor read off the path,
   across an activation the plan keeps, of a 3x3 after a strided conv; drops of convs that change the shape;
   folds and removals of blocks read from outside) are PlanErrors, and no option offers them.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph.analysis import Structure, analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph
from onnxprune.plan import Plan, PlanError, apply_plan
from onnxprune.planning.candidates import (
    Option,
    conv_l1_norms,
    enumerate_options,
    layout_refusal,
    options_plan,
    segment_refusal,
    subset_refusal,
)
from tests.conftest import run

ACTIVATIONS = (None, "Relu", "Clip", "LeakyRelu")
PROFILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ConvSpec:
    name: str
    cin: int
    cout: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...] | None  # begins then ends; None with auto_pad
    auto_pad: str | None  # "SAME_UPPER", "VALID" or None
    groups: int
    act: str | None  # the activation right after the conv

    @property
    def act_name(self) -> str:
        return f"{self.name}/act"

    def out_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(len(self.window_starts(n, d)) for d, n in enumerate(size))

    def begin_pad(self, n: int, d: int) -> int:
        if self.auto_pad == "VALID":
            return 0
        if self.auto_pad == "SAME_UPPER":
            out = -(-n // self.stride[d])
            total = max((out - 1) * self.stride[d] + self.span(d) - n, 0)
            return total // 2
        return self.pads[d]

    def span(self, d: int) -> int:
        return self.dilation[d] * (self.kernel[d] - 1) + 1

    def window_starts(self, n: int, d: int) -> list[int]:
        """First input position read by each output position along axis d (negative: in the padding)."""
        if self.auto_pad == "SAME_UPPER":
            out = -(-n // self.stride[d])
        else:
            end = 0 if self.auto_pad == "VALID" else self.pads[len(self.kernel) + d]
            out = (n + self.begin_pad(n, d) + end - self.span(d)) // self.stride[d] + 1
        return [o * self.stride[d] - self.begin_pad(n, d) for o in range(max(out, 0))]


@dataclass(frozen=True)
class BlockSpec:
    name: str  # the join's node name
    items: tuple  # ConvSpec | BlockSpec
    shortcut_first: bool
    act: str | None  # the activation after the join

    @property
    def act_name(self) -> str:
        return f"{self.name}/act"


@dataclass(frozen=True)
class Net:
    dims: int
    channels: int
    size: tuple[int, ...]
    items: tuple  # ConvSpec | BlockSpec
    reads: tuple[tuple[str, str], ...]  # (tensor, "output" | "reduce"): tensors read off the path
    seed: int
    weights: dict = field(default_factory=dict, compare=False, repr=False)

    def convs(self) -> list[ConvSpec]:
        def walk(items):
            for item in items:
                yield from walk(item.items) if isinstance(item, BlockSpec) else [item]

        return list(walk(self.items))

    def params(self, conv: ConvSpec) -> tuple[np.ndarray, np.ndarray]:
        if conv.name not in self.weights:
            rng = np.random.default_rng([self.seed, int(conv.name[1:])])
            fan_in = conv.cin // conv.groups * int(np.prod(conv.kernel))
            w = rng.normal(0, fan_in**-0.5, (conv.cout, conv.cin // conv.groups, *conv.kernel))
            self.weights[conv.name] = (w.astype(np.float32), rng.normal(0, 0.5, conv.cout).astype(np.float32))
        return self.weights[conv.name]

    # ------------------------------------------------------------------------------------------ building

    def build(self, drop_convs=frozenset(), drop_acts=frozenset(), remove_blocks=frozenset(),
              reference: bool = False) -> onnx.ModelProto:
        """The network, or (``reference``) the network with those convs as identities, those activation
        nodes gone and those blocks' branches gone; every output then goes through an Identity named
        ``out<k>`` (a read tensor may have been dropped with its node)."""
        nodes, inits = [], []
        alias: dict[str, str] = {}

        def const(name, value):
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
            return name

        def activation(x: str, kind: str | None, name: str) -> str:
            out = f"{name}:out"
            if kind is None or name in drop_acts:
                alias[out] = x
                return x
            if kind == "Relu":
                nodes.append(helper.make_node("Relu", [x], [out], name=name))
            elif kind == "Clip":
                nodes.append(helper.make_node("Clip", [x, const(f"{name}.min", 0.0), const(f"{name}.max", 6.0)],
                                              [out], name=name))
            else:
                nodes.append(helper.make_node("LeakyRelu", [x], [out], name=name, alpha=0.1))
            alias[out] = out
            return out

        def conv(x: str, c: ConvSpec) -> str:
            out = f"{c.name}:out"
            if c.name in drop_convs:
                alias[out] = x
                return activation(x, c.act, c.act_name)
            w, b = self.params(c)
            attrs = dict(kernel_shape=list(c.kernel), strides=list(c.stride), dilations=list(c.dilation),
                         group=c.groups)
            if c.auto_pad:
                attrs["auto_pad"] = c.auto_pad
            else:
                attrs["pads"] = list(c.pads)
            nodes.append(helper.make_node("Conv", [x, const(f"{c.name}.w", w), const(f"{c.name}.b", b)], [out],
                                          name=c.name, **attrs))
            alias[out] = out
            return activation(out, c.act, c.act_name)

        def items(x: str, seq) -> str:
            for item in seq:
                if isinstance(item, ConvSpec):
                    x = conv(x, item)
                    continue
                out = f"{item.name}:out"
                if item.name in remove_blocks:
                    alias[out] = x
                else:
                    y = items(x, item.items)
                    nodes.append(helper.make_node("Add", [x, y] if item.shortcut_first else [y, x], [out],
                                                  name=item.name))
                    alias[out] = out
                x = activation(out if item.name not in remove_blocks else x, item.act, item.act_name)
            return x

        final = items("input", self.items)
        outputs = [final]
        for k, (tensor, kind) in enumerate(self.reads):
            source = alias.get(tensor, tensor) if tensor in alias else None
            if source is None:  # produced by a node that the reference leaves out (a removed branch)
                continue
            if kind == "reduce":
                nodes.append(helper.make_node("ReduceMean", [source], [f"read{k}"], name=f"read{k}", axes=[1],
                                              keepdims=1))
                outputs.append(f"read{k}")
            else:
                outputs.append(source)
        if reference:
            named = []
            for k, t in enumerate(outputs):
                nodes.append(helper.make_node("Identity", [t], [f"out{k}"], name=f"out{k}"))
                named.append(f"out{k}")
            outputs = named
        graph = helper.make_graph(
            nodes, "chain",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", self.channels, *self.size])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        # Outputs declare their shapes, as exported models do (onnxprune's inference keeps declared outputs as
        # they are).
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        return infer_shapes(model)

    def taint(self, tainting: frozenset[str], drop_convs=frozenset(), remove_blocks=frozenset()) -> list:
        """Per output (the final one, then the reads in ``build`` order) and per axis, a boolean mask of the
        positions that may differ because a conv in ``tainting`` zero-pads its input inside a merged run."""
        masks: dict[str, list[np.ndarray]] = {}

        def conv(x: list[np.ndarray], c: ConvSpec) -> list[np.ndarray]:
            if c.name in drop_convs:
                masks[f"{c.name}:out"] = masks[f"{c.act_name}:out"] = x
                return x
            out = []
            for d, m in enumerate(x):
                row = []
                for start in c.window_starts(len(m), d):
                    taps = [start + j * c.dilation[d] for j in range(c.kernel[d])]
                    row.append(any(m[t] for t in taps if 0 <= t < len(m))
                               or (c.name in tainting and any(not 0 <= t < len(m) for t in taps)))
                out.append(np.array(row, bool))
            masks[f"{c.name}:out"] = masks[f"{c.act_name}:out"] = out
            return out

        def items(x, seq):
            for item in seq:
                if isinstance(item, ConvSpec):
                    x = conv(x, item)
                elif item.name in remove_blocks:
                    masks[f"{item.name}:out"] = masks[f"{item.act_name}:out"] = x
                else:
                    y = items(x, item.items)
                    x = [a | b for a, b in zip(x, y)]
                    masks[f"{item.name}:out"] = masks[f"{item.act_name}:out"] = x
            return x

        final = items([np.zeros(n, bool) for n in self.size], self.items)
        return [final] + [masks[t] for t, _ in self.reads if t in masks]


# ----------------------------------------------------------------------------------------- the strategy


def _pads(draw, mode: str, kernel, dilation, dims: int) -> tuple[tuple[int, ...] | None, str | None]:
    spans = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if mode == "same":  # same-size when stride 1: symmetric for odd spans, the extra row at the end otherwise
        return tuple(s // 2 for s in spans) + tuple(s - s // 2 for s in spans), None
    if mode == "zero":
        return (0,) * (2 * dims), None
    if mode == "asym":
        begins = tuple(draw(st.integers(0, s)) for s in spans)
        ends = tuple(draw(st.integers(0, s)) for s in spans)
        return begins + ends, None
    return None, mode


@st.composite
def conv_specs(draw, index: int, cin: int, size: tuple[int, ...], keep_shape: bool) -> ConvSpec:
    """One conv reading ``cin`` channels of ``size``; with ``keep_shape`` its output has its input's shape."""
    dims = len(size)
    wild = draw(st.integers(0, 3)) == 0  # may be dilated or SAME-padded (what merges refuse)
    k = draw(st.sampled_from([1, 1, 3, 3, 3, 5, 2, 4]))
    kernel = (k,) * dims if dims == 1 or draw(st.integers(0, 4)) else (k, draw(st.sampled_from([1, 3])))
    dilation = (draw(st.sampled_from([1, 2])) if wild else 1,) * dims
    stride = (1,) * dims if keep_shape else (draw(st.sampled_from([1, 1, 2])),) * dims
    modes = ["same", "same", "asym"] if keep_shape else ["same", "same", "zero", "asym", "VALID"]
    mode = draw(st.sampled_from(modes + ["SAME_UPPER"] if wild else modes))
    if keep_shape and mode == "asym":  # asymmetric, still same-size
        spans = [d * (kk - 1) for kk, d in zip(kernel, dilation)]
        begins = tuple(draw(st.integers(0, s)) for s in spans)
        pads, auto = begins + tuple(s - b for s, b in zip(spans, begins)), None
    else:
        pads, auto = _pads(draw, mode, kernel, dilation, dims)
    grouping = draw(st.sampled_from(["dense", "dense", "depthwise", "depthwise", "grouped", "multiplier"]))
    divisors = [g for g in range(2, cin) if cin % g == 0]
    if grouping == "depthwise" or (grouping == "multiplier" and keep_shape):
        groups, cout = cin, cin
    elif grouping == "multiplier" and cin <= 4:
        groups, cout = cin, 2 * cin
    elif grouping == "grouped" and divisors:
        groups = draw(st.sampled_from(divisors))
        couts = [c for c in (cin, 2 * cin) if c % groups == 0 and c <= max(cin, 8)]
        cout = cin if keep_shape else draw(st.sampled_from(couts))
    else:
        groups, cout = 1, cin if keep_shape or cin >= 8 else draw(st.sampled_from([cin, cin, 2 * cin]))
    act = draw(st.sampled_from(ACTIVATIONS))
    conv = ConvSpec(f"c{index}", cin, cout, kernel, stride, dilation, pads, auto, groups, act)
    if conv.auto_pad == "SAME_UPPER":  # onnxruntime refuses dilated SAME convs
        conv = replace(conv, dilation=(1,) * dims)
    if min(conv.out_size(size)) < 3:  # keep maps big enough to have an interior
        conv = replace(conv, pads=_pads(draw, "same", kernel, conv.dilation, dims)[0], auto_pad=None)
    return conv


@st.composite
def nets(draw, max_convs: int = 5) -> Net:
    dims = draw(st.sampled_from([1, 2, 2, 2, 2]))
    size = (draw(st.integers(10, 16)),) if dims == 1 else tuple(draw(st.integers(6, 9)) for _ in range(2))
    channels = draw(st.sampled_from([2, 4]))
    total = draw(st.integers(1, max_convs))
    state = {"index": 0, "cin": channels, "size": size, "joins": 0}

    def draw_items(count: int, keep_shape: bool, depth: int) -> tuple:
        out = []
        while count > 0:
            if depth < 2 and draw(st.integers(0, 3)) == 0:
                n = draw(st.integers(1, min(3, count)))
                state["joins"] += 1
                name = f"j{state['joins']}"
                inner = draw_items(n, True, depth + 1)
                out.append(BlockSpec(name, inner, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS))))
                count -= n
                continue
            conv = draw(conv_specs(state["index"], state["cin"], state["size"], keep_shape))
            state["index"] += 1
            state["cin"], state["size"] = conv.cout, conv.out_size(state["size"])
            out.append(conv)
            count -= 1
        return tuple(out)

    items = draw_items(total, False, 0)
    net = Net(dims, channels, size, items, (), draw(st.integers(0, 2**16)))
    tensors = _tensors(net)[:-1]  # the final output is read anyway
    if tensors and draw(st.integers(0, 2)) == 0:
        chosen = draw(st.lists(st.sampled_from(tensors), min_size=1, max_size=2, unique=True))
        net = replace(net, reads=tuple((t, draw(st.sampled_from(["output", "reduce"]))) for t in chosen))
    return net


def _tensors(net: Net) -> list[str]:
    """The tensors the network computes, in order."""
    out = []

    def walk(items):
        for item in items:
            if isinstance(item, ConvSpec):
                out.append(f"{item.name}:out")
                if item.act:
                    out.append(f"{item.act_name}:out")
            else:
                walk(item.items)
                out.append(f"{item.name}:out")
                if item.act:
                    out.append(f"{item.act_name}:out")

    walk(net.items)
    return out


# ------------------------------------------------------------------------------------------- checking


def options_of(net: Net) -> tuple[onnx.ModelProto, Structure, list[Option]]:
    model = net.build()
    structure = analyze_model(model)
    assert [c.name for c in structure.convs] == [c.name for c in net.convs()]
    return model, structure, enumerate_options(structure, conv_l1_norms(to_graph(model)))


class Checker:
    """Runs a network and the references of its options on one random input."""

    def __init__(self, net: Net, model: onnx.ModelProto) -> None:
        self.net = net
        rng = np.random.default_rng(net.seed)
        self.feeds = {"input": rng.normal(size=(1, net.channels, *net.size)).astype(np.float32)}
        self.references: dict[tuple, list[np.ndarray]] = {}

    def expect(self, pruned: onnx.ModelProto, drop_convs, drop_acts, remove_blocks, tainting, what) -> None:
        key = (frozenset(drop_convs), frozenset(drop_acts), frozenset(remove_blocks))
        if key not in self.references:
            self.references[key] = run(self.net.build(*key, reference=True), self.feeds)
        expected = self.references[key]
        masks = self.net.taint(frozenset(tainting), key[0], key[2])
        got = run(pruned, self.feeds)
        assert len(got) == len(expected) == len(masks), what
        for k, (a, b, mask) in enumerate(zip(got, expected, masks)):
            assert a.shape == b.shape, (what, k, a.shape, b.shape)
            axes = [m.reshape([-1 if i == d else 1 for i in range(len(mask))]) for d, m in enumerate(mask)]
            keep = np.broadcast_to(~functools.reduce(np.logical_or, axes), a.shape)
            scale = max(1.0, float(np.abs(b).max()))
            err = float(np.abs(a - b)[keep].max()) if keep.any() else 0.0
            assert err <= 2e-5 * scale, (what, f"output {k}: max error {err} on {keep.sum()}/{keep.size} compared")


def _tainting(keep: tuple[str, ...], merged: bool) -> set[str]:
    """Convs whose zero padding the merged conv does not see: every kept conv but the first of a merge."""
    return set(keep[1:]) if merged else set()


def check_option(net: Net, model: onnx.ModelProto, checker: Checker, option: Option) -> None:
    plan = Plan(**options_plan([option]))
    pruned, summary = apply_plan(model, plan)  # the option is accepted
    merged = option.fold_identity is not None or len(option.keep) > 1
    if option.keep:  # the conv the option leaves is the one it announced
        name = f"{option.keep[0]}/merged" if merged else option.keep[0]
        node = next(n for n in pruned.graph.node if n.name == name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        announced = (list(option.kernel), list(option.stride), option.groups)
        assert (attrs["kernel_shape"], attrs["strides"], attrs.get("group", 1)) == announced, (option, attrs)
    remove = {option.remove_block} if option.remove_block else set()
    drops = set() if remove else set(option.drop)
    acts = set() if remove else set(option.drop_activations)
    checker.expect(pruned, drops, acts, remove, _tainting(option.keep, merged), option)


# --------------------------------------------------------------------------------------------- the tests


@PROFILE
@given(nets())
def test_every_option_applies_and_equals_its_definition(net):
    model, structure, options = options_of(net)
    note(f"options: {options}")
    checker = Checker(net, model)
    for option in options:
        check_option(net, model, checker, option)


def _events(net: Net) -> list[str]:
    """Conv, activation and join node names in the order the network computes them."""
    out: list[str] = []

    def walk(items):
        for item in items:
            if isinstance(item, BlockSpec):
                walk(item.items)
            out.append(item.name)
            if item.act:
                out.append(item.act_name)

    walk(net.items)
    return out


def _inner_activations(net: Net, first: str, last: str) -> set[str]:
    """The activation nodes computed strictly between node ``first`` and node ``last`` (a conv or a join)."""
    events = _events(net)
    return {n for n in events[events.index(first) + 1:events.index(last)] if n.endswith("/act")}


@settings(PROFILE, max_examples=40)
@given(nets(max_convs=4))
def test_brute_force_every_segment_and_subset(net):
    """Every segment of the chain and every subset of its convs to keep (the others dropped with the
    activations inside): what ``segment_refusal`` accepts applies and equals its definition; what it refuses
    is never offered, and

    - dropping a conv that cannot become the identity, or merging what the conv and stride rules refuse, is a
      PlanError;
    - a plan that only drops convs, refused for what lies between them (a join or a tensor read elsewhere,
      which stays: the segment does not become one conv), applies and equals its definition;
    - a merge refused for what lies between the convs is a PlanError, unless the segment wholly holds an
      identity block: the candidates leave those out by choice (docs/algorithms.md 4.1), and the rewrite may
      take them (an identity join wholly inside the run) or refuse them, never compute something else.
    """
    model, structure, options = options_of(net)
    checker = Checker(net, model)
    convs = structure.convs
    offered = {(o.start, o.end, o.keep, o.fold_identity) for o in options if o.remove_block is None}
    joins = {(sp["source"] + 1, sp["target"] + 1): structure.residual_blocks[sp["block"]].join
             for sp in reversed(structure.spans)}  # the innermost block of a span, as the candidates take it
    for s in range(len(convs)):
        for e in range(s + 1, len(convs) + 1):
            exact = joins.get((s, e))
            acts = _inner_activations(net, convs[s].name, exact or convs[e - 1].name)
            layout = layout_refusal(structure, s, e)
            for r in range(1, e - s + 1):
                for kept in itertools.combinations(convs[s:e], r):
                    dropped = [c.name for c in convs[s:e] if c not in kept]
                    keep = tuple(c.name for c in kept)
                    merged = exact is not None or len(kept) > 1
                    if not merged and not dropped:
                        continue  # the conv itself: nothing to do
                    refusal = segment_refusal(structure, s, e, keep)
                    assert refusal == (layout or subset_refusal(structure, s, e, keep))
                    what = (s, e, keep, refusal)
                    plan = Plan(drop_activations=sorted(acts), drop_convs=dropped,
                                merge=[{"convs": list(keep), "fold_identity": exact} if exact else list(keep)]
                                if merged else [])
                    if refusal is not None:
                        assert (s, e, keep, exact) not in offered, what
                    # the convs that merge: from the first kept to the last, or the block whose identity folds
                    p, q = (s, e) if exact else (kept[0].index, kept[-1].index + 1)
                    if refusal is None or not merged and subset_refusal(structure, s, e, keep) is None:
                        # accepted; or only drops, refused for a join or read that stays (it is not one conv)
                        pruned, _ = apply_plan(model, plan)
                    elif subset_refusal(structure, s, e, keep) is None and _holds_block(structure, s, e):
                        try:  # outside the candidates' search space by choice: the rewrite may take it
                            pruned, _ = apply_plan(model, plan)
                        except PlanError:
                            continue
                    elif subset_refusal(structure, s, e, keep) is None and layout_refusal(structure, p, q) is None:
                        pruned, _ = apply_plan(model, plan)  # what stops the segment lies among dropped convs
                    else:
                        with pytest.raises(PlanError):
                            apply_plan(model, plan)
                            note(f"not refused: {what}")
                        continue
                    checker.expect(pruned, set(dropped), acts, set(), _tainting(keep, merged), what)


def _holds_block(structure: Structure, s: int, e: int) -> bool:
    """Whether segment s..e-1 wholly holds an identity span other than its own."""
    return any(s <= sp["source"] + 1 and sp["target"] + 1 <= e and (sp["source"] + 1, sp["target"] + 1) != (s, e)
               for sp in structure.spans if structure.residual_blocks[sp["block"]].shortcut == "identity")


# ------------------------------------------------------------------------------------ named refusals


def _conv(i: int, cin: int = 4, cout: int = 4, k: int = 3, stride: int = 1, dilation: int = 1, pads=None,
          auto_pad: str | None = None, groups: int = 1, act: str | None = "Relu", dims: int = 2) -> ConvSpec:
    if pads is None and auto_pad is None:
        pads = (dilation * (k - 1) // 2,) * (2 * dims)
    return ConvSpec(f"c{i}", cin, cout, (k,) * dims, (stride,) * dims, (dilation,) * dims, pads, auto_pad, groups, act)


def _net(*items, reads=(), dims: int = 2, size: int = 8) -> Net:
    first = items[0] if isinstance(items[0], ConvSpec) else items[0].items[0]
    return Net(dims, first.cin, (size,) * dims, tuple(items), tuple(reads), seed=7)


PLAIN = _net(_conv(0), _conv(1), _conv(2))
READ = (("c0/act:out", "output"),)
BLOCK_READ = _net(_conv(0), BlockSpec("j1", (_conv(1),), True, None), _conv(2), reads=(("c1:out", "reduce"),))

def _merges(*convs):
    return lambda o: (len(o.keep) > 1 or o.fold_identity is not None) and set(convs) <= set(o.keep)


def _drops(conv):
    return lambda o: o.remove_block is None and conv in o.drop


REFUSALS = {
    # name: (net, plan, what the PlanError says, the options that would do the same: none may be offered)
    "merge across a dilated conv": (
        _net(_conv(0), _conv(1, dilation=2), _conv(2)), Plan(drop_activations=["c0/act"], merge=[["c0", "c1"]]),
        "dilated", _merges("c1")),
    "merge across a SAME_UPPER conv": (
        _net(_conv(0), _conv(1, auto_pad="SAME_UPPER"), _conv(2)),
        Plan(drop_activations=["c0/act"], merge=[["c0", "c1"]]), "SAME-padded", _merges("c1")),
    "merge of 1-D convs": (
        _net(_conv(0, dims=1), _conv(1, dims=1), dims=1, size=12),
        Plan(drop_activations=["c0/act"], merge=[["c0", "c1"]]), "1-D", _merges()),
    "merge across a tensor that is a graph output": (
        _net(_conv(0), _conv(1), reads=READ), Plan(drop_activations=["c0/act"], merge=[["c0", "c1"]]),
        "graph output", _merges("c0", "c1")),
    "merge across a tensor read by a side branch": (
        _net(_conv(0), _conv(1), reads=(("c0:out", "reduce"),)),
        Plan(drop_activations=["c0/act"], merge=[["c0", "c1"]]), "also read by read0", _merges("c0", "c1")),
    "merge of a 3x3 after a strided conv": (
        _net(_conv(0, stride=2), _conv(1)), Plan(drop_activations=["c0/act"], merge=[["c0", "c1"]]),
        "only 1x1 convs may follow the strided conv", _merges("c0", "c1")),
    "merge across an activation the plan keeps": (
        PLAIN, Plan(merge=[["c0", "c1"]]), "c0/act .* lies inside the merge",
        lambda o: {"c0", "c1"} <= set(o.keep) and "c0/act" not in o.drop_activations),
    "merge that skips a conv": (
        PLAIN, Plan(drop_activations=["c0/act", "c1/act"], merge=[["c0", "c2"]]), "consecutive",
        lambda o: o.keep == ("c0", "c2") and "c1" not in o.drop),
    "drop of a channel-changing conv": (
        _net(_conv(0), _conv(1, cout=8)), Plan(drop_convs=["c1"]), "channel count", _drops("c1")),
    "drop of a strided conv": (
        _net(_conv(0), _conv(1, stride=2)), Plan(drop_convs=["c1"]), "strided", _drops("c1")),
    "drop of an unpadded conv": (
        _net(_conv(0), _conv(1, pads=(0, 0, 0, 0))), Plan(drop_convs=["c1"]), "changes the shape", _drops("c1")),
    "fold of a block whose branch is read outside": (
        BLOCK_READ, Plan(merge=[{"convs": ["c1"], "fold_identity": "j1"}]), "not removable",
        lambda o: o.fold_identity == "j1"),
    "removal of a block whose branch is read outside": (
        BLOCK_READ, Plan(remove_blocks=["j1"]), "not removable", lambda o: o.remove_block == "j1"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_what_the_rules_refuse_is_a_plan_error(name):
    net, plan, message, same = REFUSALS[name]
    model, structure, options = options_of(net)
    with pytest.raises(PlanError, match=message):
        apply_plan(model, plan)
    assert not [o for o in options if same(o)]


def test_convs_that_cannot_merge_can_still_be_dropped_beside_others():
    """Dropping needs no merge: a segment's convs answer to the merge rules only when they are merged."""
    nets = [
        _net(_conv(0, dims=1), _conv(1, dims=1), dims=1, size=12),
        _net(_conv(0, dilation=2), _conv(1)),
        _net(_conv(0), _conv(1, auto_pad="SAME_UPPER")),
        _net(_conv(0, stride=2), _conv(1)),  # the 3x3 after the strided conv goes
    ]
    for net in nets:
        model, structure, options = options_of(net)
        option = next((o for o in options if (o.start, o.end) == (0, 2) and len(o.keep) == 1), None)
        assert option is not None and option.drop_activations == ("c0/act",), (net, options)
        check_option(net, model, Checker(net, model), option)


def test_a_folded_identity_drops_the_activation_before_its_join():
    """x + relu(conv(x)) folds into one conv only without the relu: the option says so."""
    net = _net(_conv(0), BlockSpec("j1", (_conv(1, act="LeakyRelu"),), False, "Relu"))
    model, structure, options = options_of(net)
    fold = next(o for o in options if o.fold_identity == "j1")
    assert fold.drop_activations == ("c1/act",)
    check_option(net, model, Checker(net, model), fold)


def test_a_depthwise_conv_with_a_channel_multiplier_merges_into_a_dense_conv():
    net = _net(_conv(0, cout=8, groups=4, k=1, act=None), _conv(1, cin=8, cout=8, groups=8))
    model, structure, options = options_of(net)
    merged = next(o for o in options if o.keep == ("c0", "c1"))
    assert (merged.depthwise, merged.groups) == (False, 1)
    check_option(net, model, Checker(net, model), merged)
