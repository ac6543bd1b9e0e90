"""The result objects (onnxprune.results; docs/api.md, "Results"): typed attributes read from the verb's record,
and ``to_dict()`` giving that record back, unchanged, as a copy."""

import json

import numpy as np
import onnx
import pytest

from onnxprune import api
from onnxprune.options import DataOptions, LatencyOptions, OutputOptions, RepairOptions, TargetOptions
from onnxprune.results import Agreement, HealResult, PruneResult, predicted_speedup
from onnxprune.verify import Verification
from tests.builders import GraphBuilder, residual_block


@pytest.fixture
def net(tmp_path):
    g = GraphBuilder(("batch", 3, 16, 16))
    x = g.relu(g.conv(g.input, 8))
    x = residual_block(g, residual_block(g, residual_block(g, x)))
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], 8)
    w = g.const(g.rng.normal(size=(4, 8)).astype(np.float32))
    path = tmp_path / "net.onnx"
    onnx.save(g.build([g.node("Gemm", [pooled, w, g.const(np.zeros(4, np.float32))], 4, transB=1)]), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 3, 16, 16), dtype=np.float32))
    return path


def same_record(result) -> dict:
    record = result.to_dict()
    assert result.to_dict() == record == json.loads(json.dumps(record))  # plain JSON, the same every time
    record.clear()
    assert result.to_dict()  # a copy: the result is not changed through it
    assert type(result).from_dict(result.to_dict()) == result
    return result.to_dict()


def test_every_verb_returns_its_result_with_the_record_the_cli_prints(net, tmp_path):
    calib = DataOptions(str(tmp_path / "calib.npz"))
    pruned = api.prune(net, TargetOptions(remove_blocks=1), OutputOptions(str(tmp_path / "p.onnx")), calib)
    record = same_record(pruned)
    assert pruned.output == tmp_path / "p.onnx" and pruned.plan == tmp_path / "p.plan.json" and pruned.plan.exists()
    assert pruned.method == "slp" and pruned.target_met and pruned.message == ""
    assert list(pruned.removed_blocks) == record["removed_blocks"] and len(pruned.removed_blocks) == 1
    assert pruned.verification.passed and pruned.verification.to_dict() == record["verification"]
    assert pruned.measured_speedup is None and pruned.after_healing is None and pruned.repair_agreement is None
    assert pruned.macs_after < pruned.macs_before and "verification_text" in record

    applied = api.apply(net, pruned.plan, tmp_path / "a.onnx")
    assert same_record(applied)["plan"]["removed_blocks"] == list(applied.removed_blocks)
    assert applied.changes_function and applied.verification.passed

    scored = api.score(net, calib)
    assert [b.join for b in scored.blocks] == [b["join"] for b in same_record(scored)["blocks"]]
    assert scored.ranking[0] == min(scored.blocks, key=lambda b: b.score).join

    evaluated = api.evaluate(tmp_path / "p.onnx", calib, reference=str(net))
    assert same_record(evaluated)["agreement"] == evaluated.agreement and evaluated.accuracy is None

    repaired = api.repair(tmp_path / "p.onnx", net, OutputOptions(str(tmp_path / "r.onnx")), calib, RepairOptions())
    assert same_record(repaired)["agreement"]["repaired"] == repaired.agreement_repaired and repaired.maps >= 1

    bench = api.bench(net, tmp_path / "p.onnx", LatencyOptions(rounds=3))
    assert same_record(bench)["speedup"] == bench.speedup and bench.models == (str(net), str(tmp_path / "p.onnx"))
    assert len(bench.latencies_s) == 2 and bench.backend == "ort-cpu"

    table = api.latency(net, tmp_path / "t.json", LatencyOptions(rounds=2))
    assert same_record(table)["rows"] == table.rows and table.output.exists()


def test_predicted_speedup_is_the_kept_attempts():
    attempts = [{"predicted_s": 2.0, "predicted_speedup": 1.5}, {"predicted_s": 1.0, "predicted_speedup": 3.0}]
    assert predicted_speedup({"predicted_latency_s": 2.0, "attempts": attempts}) == 1.5
    assert predicted_speedup({"predicted_latency_s": None, "attempts": attempts}) is None
    assert predicted_speedup({}) is None


def test_a_healed_record_reads_as_agreements():
    stage = {"agreement": 0.9, "accuracy": 0.8, "mean_kl": 0.1}
    verification = Verification(True, "ok", "ok", "cpu", "given").to_dict()
    record = {"output": "h.onnx", "plan": "h.plan.json", "teacher": "m.onnx", "data": "d", "before_pruning": stage,
              "after_pruning": {**stage, "agreement": 0.5}, "after_healing": {"agreement": 0.7, "mean_kl": 0.2},
              "held_back_samples": 10, "target_met": False, "message": "m", "verification": verification}
    healed = HealResult.from_dict(record)
    assert healed.after_pruning == Agreement(0.5, 0.1, 0.8) and healed.after_healing.accuracy is None
    assert not healed.target_met and healed.to_dict() == record
    with pytest.raises(KeyError):
        PruneResult.from_dict({"output": "o.onnx"})  # a record missing what every prune writes is a bug
