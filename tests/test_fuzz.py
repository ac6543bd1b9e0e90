"""Fuzzing the command line with broken inputs (hypothesis): valid ONNX files mutated byte by byte (flips,
truncations, insertions) and structurally (a node dropped, a tensor renamed, an initializer's dims or data type
corrupted, an attribute changed, the graph outputs removed, the opset or an input's shape changed), and calibration
arrays mutated (wrong dtype or shape, NaN/Inf, empty, a missing key, bad labels, a damaged file), fed to
``analyze``, ``score``, ``prune``, ``apply``, ``eval`` and ``heal`` through ``onnxprune.cli.main`` in-process.

What every run must do (README, "exit status"):

- never a traceback, never an unexpected internal error (status 1 with "run with --debug": a bug);
- exit 2 with exactly one line on stderr, "onnxprune: error: ..." naming the problem, for a bad input;
- a mutation can leave the input valid (a flipped bit in a weight, a renamed but consistent node): then exit 0
  with the outputs written (valid ONNX, one JSON object on stdout) is right, and so is 4 (prune's target missed,
  outputs written); exit 1 "verification failed", with one line, is right when a mutated weight makes the result
  fail verification (non-finite outputs, say);
- on any non-zero exit other than 4, nothing in the output folder (no model, no plan, no temporary file);
- the input files byte for byte unchanged.

The default run draws a few dozen cases per test; under CI (env CI set) the draws are derandomized
(tests/conftest.py). ``-m slow`` runs test_ten_thousand_cases (10,000 cases over every verb and mutation kind;
``FUZZ_CASES=N`` for another count): ``python3 -m pytest tests/test_fuzz.py -m slow -s`` prints how they ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxprune.cli import main
from tests.builders import GraphBuilder, residual_block

SAMPLES = 20
VERBS = ("analyze", "score", "prune", "apply", "eval", "heal")
DATA_VERBS = ("score", "prune", "eval", "heal")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SLOW_CASES = int(os.environ.get("FUZZ_CASES", 10_000))  # the slow run's cases (FUZZ_CASES=200 for a short one)


# -- the valid inputs -----------------------------------------------------------------------------

def classifier() -> onnx.ModelProto:
    """conv, two residual blocks, global pooling, a Gemm: small, with everything each verb looks for."""
    g = GraphBuilder(("N", 3, 8, 8))
    x = g.relu(g.conv(g.input, 8))
    x = residual_block(g, residual_block(g, x))
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    w = g.const(g.rng.normal(0, 0.3, (10, 8)).astype(np.float32))
    b = g.const(np.zeros(10, np.float32), "b")
    return g.build([g.node("Gemm", [x, w, b], 10, transB=1)])


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    """The valid inputs every case starts from: model, its pruned form, a plan, calibration data."""
    from onnxprune import api

    folder = tmp_path_factory.mktemp("fuzz_inputs")
    model = classifier()
    onnx.save(model, folder / "model.onnx")
    join = api.analyze(folder / "model.onnx").residual_blocks[0].join
    (folder / "plan.json").write_text(json.dumps({"remove_blocks": [join]}))
    api.apply(folder / "model.onnx", folder / "plan.json", folder / "pruned.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((SAMPLES, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, SAMPLES))
    return {"model": folder / "model.onnx", "pruned": folder / "pruned.onnx", "plan": folder / "plan.json",
            "data": folder / "calib.npz"}


def command(verb: str, files: dict[str, Path], out: Path) -> list[str]:
    """The command line of ``verb`` on ``files`` (model, pruned, plan, data), writing into ``out``."""
    model, data = str(files["model"]), ["--data", str(files["data"]), "--batch", "8"]
    return {
        "analyze": ["analyze", model, "--json"],
        "score": ["score", model, *data, "--json"],
        "prune": ["prune", model, *data, "--remove-blocks", "1", "-o", str(out / "pruned.onnx"), "--json"],
        "apply": ["apply", model, str(files["plan"]), "-o", str(out / "applied.onnx"), "--json"],
        "eval": ["eval", model, *data, "--reference", model, "--json"],
        "heal": ["heal", str(files["pruned"]), "--teacher", model, *data, "--steps", "2", "--heal-batch", "8",
                 "-o", str(out / "healed.onnx"), "--json"],
    }[verb] + ["--quiet"]


# -- mutations ------------------------------------------------------------------------------------

class Mutation(NamedTuple):
    kind: str  # "bytes": change(file bytes) -> bytes; "model": change(ModelProto) in place; "arrays": of an .npz
    name: str  # what it does, for the report of a failing case
    change: Callable


@st.composite
def byte_mutation(draw):
    """A function of the file's bytes: flips, a truncation or an insertion."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert"]))
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1,
                              max_size=8))

        def flip(data: bytes) -> bytes:
            b = bytearray(data)
            for where, mask in flips:
                b[int(where * len(b))] ^= mask
            return bytes(b)

        return Mutation("bytes", f"flip {flips}", flip)
    if kind == "truncate":
        where = draw(st.floats(0, 1, exclude_max=True))
        return Mutation("bytes", f"truncate at {where:.4f}", lambda data: data[:int(where * len(data))])
    where, extra = draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=64))
    return Mutation("bytes", f"insert {extra!r} at {where:.4f}",
                    lambda data: data[:int(where * len(data))] + extra + data[int(where * len(data)):])


def _pick(items, index: int):
    return items[index % len(items)] if len(items) else None


@st.composite
def structural_mutation(draw):
    """A function that changes one thing in the model's structure (in place)."""
    kind = draw(st.sampled_from(["drop node", "rename input", "rename graph input", "initializer dims",
                                 "initializer type", "attribute", "drop attribute", "remove outputs", "opset",
                                 "input shape", "input type", "ir version", "initializer data"]))
    i, j = draw(st.integers(0, 1000)), draw(st.integers(0, 1000))
    value = draw(st.sampled_from([-1, 0, 1, 2, 3, 5, 7, 16, 1 << 20, 1 << 40]))
    new_name = draw(st.sampled_from(["missing", "", "input", "x y", "Ω"]))

    def mutate(m: onnx.ModelProto) -> None:
        g = m.graph
        node = _pick(g.node, i)
        init = _pick(g.initializer, i)
        if kind == "drop node":
            del g.node[i % len(g.node)]
        elif kind == "rename input" and node.input:
            node.input[j % len(node.input)] = new_name
        elif kind == "rename graph input":
            g.input[0].name = new_name
        elif kind == "initializer dims" and init is not None:
            if init.dims:
                init.dims[j % len(init.dims)] = value
            else:
                init.dims.append(value)
        elif kind == "initializer type" and init is not None:
            init.data_type = value % 24 if value >= 0 else 99
        elif kind == "initializer data" and init is not None:
            init.raw_data = init.raw_data[: j % (len(init.raw_data) + 1)]
        elif kind in ("attribute", "drop attribute"):
            with_attrs = [n for n in g.node if n.attribute]
            target = _pick(with_attrs, i)
            if target is None:
                return
            attr = target.attribute[j % len(target.attribute)]
            if kind == "drop attribute":
                target.attribute.remove(attr)
            elif attr.type == onnx.AttributeProto.INT:
                attr.i = value
            elif attr.type == onnx.AttributeProto.INTS:
                attr.ints[:] = [value] * max(1, len(attr.ints) - (j % 2))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = float("nan") if value < 0 else float(value)
            else:
                attr.type = onnx.AttributeProto.STRING
        elif kind == "remove outputs":
            del g.output[: 1 + j % len(g.output)]
        elif kind == "opset":
            m.opset_import[0].version = value % 30
        elif kind == "input shape":
            dims = g.input[0].type.tensor_type.shape.dim
            dims[j % len(dims)].dim_value = value if value > 0 else 0
        elif kind == "input type":
            g.input[0].type.tensor_type.elem_type = value % 17
        elif kind == "ir version":
            m.ir_version = value % 12

    return Mutation("model", f"{kind} i={i} j={j} value={value} name={new_name!r}", mutate)


@st.composite
def data_mutation(draw):
    """A function of the calibration archive's arrays (a dict), or of the file's bytes (``bytes:`` kinds)."""
    kind = draw(st.sampled_from(["dtype", "shape", "nan", "inf", "empty", "missing key", "labels length",
                                 "labels float", "labels range", "labels 2d", "one sample", "bytes", "scalar"]))
    dtype = draw(st.sampled_from(["int8", "uint8", "float64", "float16", "bool", "int64", "complex64", "U3"]))
    axis, size = draw(st.integers(0, 3)), draw(st.integers(0, 9))
    where = draw(st.floats(0, 1, exclude_max=True))

    def mutate(arrays: dict) -> dict:
        x, y = arrays["x"], arrays["y"]
        if kind == "dtype":
            x = x.astype(dtype)
        elif kind == "shape":
            shape = list(x.shape)
            shape[axis] = size
            x = np.resize(x, shape)
        elif kind in ("nan", "inf"):
            x = x.copy()
            x.flat[int(where * x.size)] = np.nan if kind == "nan" else -np.inf
        elif kind == "empty":
            x, y = x[:0], y[:0]
        elif kind == "missing key":
            return {"q": x, "y": y}
        elif kind == "labels length":
            y = y[: size % len(y)]
        elif kind == "labels float":
            y = y.astype(np.float32) + 0.5
        elif kind == "labels range":
            y = y.copy()
            y[int(where * len(y))] = -1 if size % 2 else 10 ** size
        elif kind == "labels 2d":
            y = np.stack([y, y], axis=1)
        elif kind == "one sample":
            x, y = x[:1], y[:1]
        elif kind == "scalar":
            x = np.float32(size)
        return {"x": x, "y": y}

    if kind == "bytes":
        return draw(byte_mutation())
    return Mutation("arrays", f"{kind} dtype={dtype} axis={axis} size={size} where={where:.3f}", mutate)


# -- running a case -------------------------------------------------------------------------------

def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mutated_inputs(valid: dict[str, Path], folder: Path, role: str, mutation: Mutation) -> dict[str, Path]:
    """The valid inputs with the one named ``role`` replaced by its mutated copy in ``folder``."""
    source = valid[role]
    target = folder / source.name
    if mutation.kind == "arrays":
        with np.load(source) as archive:
            np.savez(target, **mutation.change({k: archive[k] for k in archive.files}))
    elif mutation.kind == "bytes":
        target.write_bytes(mutation.change(source.read_bytes()))
    else:
        model = onnx.load(source)
        try:
            mutation.change(model)
            target.write_bytes(model.SerializeToString())
        except Exception:  # a mutation protobuf itself refuses (a value out of range): the file as it was
            target.write_bytes(source.read_bytes())
    return {**valid, role: target}


def run_case(valid: dict[str, Path], verb: str, role: str, mutation: Mutation) -> int:
    """Run ``verb`` with the input ``role`` mutated; check every invariant; the exit status."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder, out = Path(tmp) / "in", Path(tmp) / "out"
        folder.mkdir()
        out.mkdir()
        files = mutated_inputs(valid, folder, role, mutation)
        before = {p: digest(p) for p in set(files.values())}
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = main(command(verb, files, out))
            except SystemExit as exc:  # argparse
                status = exc.code
        err, printed = stderr.getvalue(), stdout.getvalue()
        case = f"{verb} with {role} mutated by {mutation.name}: status {status}\n{err}"
        assert "Traceback" not in err, case
        assert status in (0, 1, 2, 4), case
        assert {p: digest(p) for p in before} == before, case  # the inputs untouched
        if status in (0, 4):
            assert json.loads(printed)["schema_version"] == 1, case
            for written in out.glob("*.onnx"):
                onnx.checker.check_model(onnx.load(written), full_check=True)
        else:
            assert printed == "", case
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("onnxprune: error: "), case
            assert "run with --debug" not in lines[0], case  # an unexpected error: a bug
            if status == 1:
                assert "verification" in lines[0], case
            assert list(out.iterdir()) == [], case  # nothing written
        return status


ROLES = {verb: ["model"] + (["data"] if verb in DATA_VERBS else []) + (["plan"] if verb == "apply" else [])
         for verb in VERBS}
ROLES["heal"] = ["pruned", "model", "data"]


# -- the tests ------------------------------------------------------------------------------------

@FAST
@given(verb=st.sampled_from(VERBS), mutation=byte_mutation(), which=st.integers(0, 2))
def test_byte_mutations_of_a_model(valid, verb, mutation, which):
    role = "pruned" if verb == "heal" and which else "model"
    run_case(valid, verb, role, mutation)


@FAST
@given(verb=st.sampled_from(VERBS), mutation=structural_mutation(), which=st.integers(0, 2))
def test_structural_mutations_of_a_model(valid, verb, mutation, which):
    role = "pruned" if verb == "heal" and which else "model"
    run_case(valid, verb, role, mutation)


@FAST
@given(verb=st.sampled_from(DATA_VERBS), mutation=data_mutation())
def test_mutations_of_the_calibration_arrays(valid, verb, mutation):
    run_case(valid, verb, "data", mutation)


@FAST
@given(mutation=byte_mutation())
def test_byte_mutations_of_a_plan(valid, mutation):
    run_case(valid, "apply", "plan", mutation)


def any_case():
    """(verb, the input it gets mutated), and a mutation that fits that input."""
    def with_mutation(verb_role):
        role = verb_role[1]
        mutation = (data_mutation() if role == "data" else byte_mutation() if role == "plan"
                    else st.one_of(byte_mutation(), structural_mutation()))
        return st.tuples(st.just(verb_role), mutation)

    return st.sampled_from([(v, r) for v in VERBS for r in ROLES[v]]).flatmap(with_mutation)


@pytest.mark.slow
def test_ten_thousand_cases(valid):
    """10,000 cases over every verb, input and mutation kind; prints how they ended."""
    statuses: Counter = Counter()

    @settings(max_examples=SLOW_CASES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=any_case())
    def fuzz(case):
        (verb, role), mutation = case
        statuses[verb, run_case(valid, verb, role, mutation)] += 1

    fuzz()
    total = sum(statuses.values())
    print(f"fuzz: {total} cases, by verb and exit status: {dict(sorted(statuses.items()))}")
    assert total >= SLOW_CASES
