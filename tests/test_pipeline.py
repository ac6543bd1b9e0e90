"""``import onnxprune`` as a pipeline uses it (onnxprune.pipeline; docs/api.md): keywords build the option objects
the CLI builds, option objects are taken as they are, a keyword beside its option object is refused, the names are
all there without importing onnx, and the CLI prints exactly the result's ``to_dict()``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import onnxprune
from onnxprune import api, pipeline
from onnxprune.cli import JSON_SCHEMA_VERSION, main
from onnxprune.errors import OnnxPruneError
from onnxprune.options import (DataOptions, HealingOptions, LatencyOptions, OutputOptions, RayOptions, RepairOptions,
                               ScoringOptions, TargetOptions)
from onnxprune.results import BenchResult, PruneResult
from onnxprune.verify import Verification

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def calls(monkeypatch):
    """The arguments onnxprune.api's verbs are called with (they return None here)."""
    seen = {}
    for verb in ("prune", "heal", "repair", "evaluate", "score", "bench", "latency", "train_prune"):
        monkeypatch.setattr(api, verb, lambda *args, _verb=verb: seen.setdefault(_verb, args) and None)
    return seen


def test_keywords_build_the_option_objects_of_the_cli(calls):
    onnxprune.prune("m.onnx", data="calib.npz", speedup=1.5, output="out.onnx", samples=64)
    assert calls["prune"] == ("m.onnx", TargetOptions(method="layermerge", speedup=1.5), OutputOptions("out.onnx"),
                              DataOptions("calib.npz", samples=64), ScoringOptions(), LatencyOptions(), None, None,
                              None, None)
    calls.clear()
    onnxprune.prune("m.onnx", remove_blocks=2, output="o.onnx", repair=True, heal_data=Path("d.npz"), heal_steps=9,
                    backend="ort-cpu", latency_batch=8)
    _, target, _, data, _, latency, healing, heal_data, repair, ray = calls["prune"]
    assert target == TargetOptions(method="slp", remove_blocks=2) and data == DataOptions(None)
    assert latency == LatencyOptions(batch=8) and healing == HealingOptions(steps=9)
    assert heal_data == DataOptions("d.npz") and repair == RepairOptions() and ray is None


def test_option_objects_are_taken_as_they_are(calls):
    target, output, data = TargetOptions(method="sglp", remove_blocks=1), OutputOptions("o.onnx", plot=True), \
        DataOptions("d.npz", batch=8)
    onnxprune.prune("m.onnx", data, target=target, output=output, repair=RepairOptions(ridge=0.1), ray="auto")
    assert calls["prune"][1:4] == (target, output, data)
    assert calls["prune"][-2:] == (RepairOptions(ridge=0.1), RayOptions("auto"))
    onnxprune.heal("p.onnx", "m.onnx", "d.npz", output="h.onnx", healing=HealingOptions(steps=3, lr=1e-3),
                   ray=RayOptions("10.0.0.1:6379", workers=4))
    assert calls["heal"] == ("p.onnx", "m.onnx", OutputOptions("h.onnx"), DataOptions("d.npz"),
                             HealingOptions(steps=3, lr=1e-3), "auto", RayOptions("10.0.0.1:6379", workers=4))
    onnxprune.bench("a.onnx", "b.onnx", rounds=5)
    assert calls["bench"] == ("a.onnx", "b.onnx", LatencyOptions(rounds=5))
    onnxprune.evaluate_model("m.onnx", "t.npz", reference=Path("r.onnx"), samples=10)
    assert calls["evaluate"] == ("m.onnx", DataOptions("t.npz", samples=10), "r.onnx", "auto")


@pytest.mark.parametrize("call, message", [
    (lambda: onnxprune.prune("m", speedup=2.0, target=TargetOptions(remove_blocks=1), output="o"),
     "give speedup inside TargetOptions"),
    (lambda: onnxprune.prune("m", DataOptions("d"), samples=5, remove_blocks=1, output="o"),
     "give samples inside DataOptions"),
    (lambda: onnxprune.prune("m", remove_blocks=1, heal_steps=5, output="o"), "healing options need heal_data"),
    (lambda: onnxprune.bench("m", latency=LatencyOptions(), batch=4), "give batch inside LatencyOptions"),
    (lambda: onnxprune.heal("p", "m", "d", output="o", steps=3, healing=HealingOptions()),
     "give steps inside HealingOptions"),
])
def test_a_keyword_beside_its_option_object_is_refused(calls, call, message):
    with pytest.raises(OnnxPruneError, match=message):
        call()
    assert not calls


def test_every_public_name_is_there_and_importing_onnxprune_loads_no_onnx():
    code = ("import sys, onnxprune; names = dir(onnxprune); "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'numpy') if m in sys.modules), "
            "all(n in names for n in onnxprune.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["[]", "True"]
    for name in onnxprune.__all__:
        assert getattr(onnxprune, name) is not None
    assert onnxprune.prune is pipeline.prune and onnxprune.analyze is api.analyze


def verification() -> dict:
    return Verification(True, "ok", "ok", "cpu", "given").to_dict()


@pytest.mark.parametrize("verb, argv, result", [
    ("prune", ["prune", "m.onnx", "--remove-blocks", "1", "-o", "o.onnx", "--json"], PruneResult.from_dict({
        "output": "o.onnx", "plan": "PLAN", "method": "slp", "removed_blocks": ["a"], "macs_before": 4,
        "macs_after": 3, "macs_reduction": 0.25, "target_met": True, "message": "", "provider": "cpu",
        "data": "random", "random_data": True, "history": [], "notes": [], "verification": verification(),
        "verification_text": "verification PASSED"})),
    ("bench", ["bench", "a.onnx", "b.onnx", "--json"], BenchResult.from_dict({
        "backend": {"backend": "ort-cpu", "device": "cpu"}, "batch": 1, "rounds": 3, "runs_per_turn": 1,
        "models": [{"model": "a.onnx", "latency_s": 2.0}, {"model": "b.onnx", "latency_s": 1.0}], "speedup": 2.0})),
])
def test_the_cli_prints_the_results_to_dict(verb, argv, result, monkeypatch, capsys, tmp_path):
    if verb == "prune":
        result.record["plan"] = str(tmp_path / "o.plan.json")
        (tmp_path / "o.plan.json").write_text("{}")
    monkeypatch.setattr(api, verb, lambda *args, **kwargs: result)
    assert main(argv) == 0
    expected = {k: v for k, v in result.to_dict().items() if k != "verification_text"}
    assert json.loads(capsys.readouterr().out) == {"schema_version": JSON_SCHEMA_VERSION, **expected}
