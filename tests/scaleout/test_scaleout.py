"""Scale-out on Ray (issue 18; docs/scale-out.md): the connection, importance rows as Ray tasks (the same scores as
one process, up to float64 rounding, and the same plans), latency rows on Ray actors, a dying worker retried, the CLI
flags, and no Ray at all without ``--ray``. One local Ray instance (2 CPUs, tests/scaleout/conftest.py) serves the
package; a Ray already running in this process is reused and left running.

Why scores are compared within ``SAME``, not for equality: the copies' outputs are the same floats, but numpy's
OpenBLAS splits CKA's float64 sums across its threads, one in a Ray task (Ray sets OMP_NUM_THREADS=1) and as many as
the cores here: ulp-sized differences (benchmarks/RESULTS.md, "Scale-out on Ray"; one process run with
OPENBLAS_NUM_THREADS=1 and =2 differs as much). On these small nets the sums stay under OpenBLAS's threading sizes
and the scores come out equal, but nothing guarantees that (onnxprune/scaleout/scoring.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.data.sources import load_data
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.io import infer_shapes
from onnxprune.graph.normalize import to_graph
from onnxprune.importance.slp import prune_slp, removal_candidates, score_blocks
from onnxprune.latency.table import build_table, load_table
from onnxprune.options import RayOptions, ScoringOptions, TargetOptions
from onnxprune.plan import fingerprint
from onnxprune.planning.blocks import search_space
from onnxprune.planning.candidates import conv_l1_norms
from onnxprune.runtime.capture import feature_tensor
from onnxprune.runtime.compare import cka_with_original
from tests.builders import GraphBuilder, residual_block
from tests.scaleout.conftest import RESOURCE

ROOT = Path(__file__).resolve().parents[2]
SAME = 1e-12  # CKA is in [0, 1]: float64 rounding, nothing more


def small_net(seed: int = 0) -> onnx.ModelProto:
    """A stem conv, four residual blocks (one with a projection shortcut) and a classifier."""
    g = GraphBuilder(("batch", 3, 12, 12), seed=seed)
    x = g.relu(g.conv(g.input, 8))
    for k in range(4):
        x = residual_block(g, x, projection=k == 2, stride=2 if k == 2 else 1, cout=12 if k == 2 else None)
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])], 12)
    w = g.const(g.rng.normal(size=(10, 12)).astype(np.float32))
    return infer_shapes(g.build([g.node("Gemm", [pooled, w, g.const(np.zeros(10, np.float32))], 10, transB=1)]))


def connected(**kwargs):
    from onnxprune.scaleout import cluster

    return cluster.connect(RayOptions("auto", **kwargs))


def test_without_ray_no_module_imports_it(tmp_path):
    """A run without --ray imports neither ray nor onnxprune.scaleout (a fresh interpreter runs a whole score)."""
    onnx.save(small_net(), tmp_path / "net.onnx")
    script = ("import sys\nfrom onnxprune import api, cli, speedup\nfrom onnxprune.options import DataOptions\n"
              f"api.score({str(tmp_path / 'net.onnx')!r}, DataOptions('random', samples=8))\n"
              "assert 'ray' not in sys.modules, 'ray imported'\n"
              "assert not [m for m in sys.modules if m.startswith('onnxprune.scaleout')], 'scaleout imported'\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_ray_missing_is_exit_status_3_with_the_package_to_install(tmp_path, capsys, monkeypatch):
    onnx.save(small_net(), tmp_path / "net.onnx")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert main(["score", str(tmp_path / "net.onnx"), "--data", "random", "--samples", "4", "--ray"]) == 3
    assert "pip install 'onnxprune[ray]'" in capsys.readouterr().err


def test_ray_flags(capsys):
    from onnxprune.cli import parse_args, ray_options

    assert ray_options(parse_args(["score", "m.onnx", "--ray"])) == RayOptions("auto")
    assert ray_options(parse_args(["score", "m.onnx"])) is None
    args = parse_args(["latency", "m.onnx", "-o", "t.json", "--ray=head:6379", "--ray-workers", "3",
                       "--ray-resource", "jetson"])
    assert ray_options(args) == RayOptions("head:6379", "jetson", workers=3)
    heal = parse_args(["heal", "p.onnx", "--teacher", "o.onnx", "-o", "h.onnx", "--ray", "--ray-workers", "4"])
    assert ray_options(heal) == RayOptions("auto", workers=4)
    assert main(["latency", "m.onnx", "-o", "t.json", "--ray-workers", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # score has no actors: no --ray-workers
        parse_args(["score", "m.onnx", "--ray", "--ray-workers", "2"])
    with pytest.raises(Exception, match="at least 1 worker"):
        RayOptions("auto", workers=0)


class FakeRay:
    """What cluster.connect calls of ray, recorded: a cluster runs at ``running`` addresses only ("auto": one is)."""

    def __init__(self, running: set[str]) -> None:
        self.running, self.calls, self.up = running, [], False

    def is_initialized(self) -> bool:
        return self.up

    def init(self, address: str, **_) -> None:
        self.calls.append(("init", address))
        if address != "local" and address not in self.running:
            raise ConnectionError(f"nothing at {address}")
        self.up = True

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
        self.up = False

    def cluster_resources(self) -> dict:
        return {"CPU": 2.0}

    def nodes(self) -> list[dict]:
        return [{"Alive": True}]

    def cancel(self, ref, **_) -> None:
        self.calls.append(("cancel", ref))

    def kill(self, actor, **_) -> None:
        self.calls.append(("kill", actor))


def test_connect_starts_ray_when_none_runs_and_on_ctrl_c_cancels_and_shuts_down(monkeypatch):
    from onnxprune.errors import UnavailableBackend
    from onnxprune.scaleout import cluster

    fake = FakeRay(running=set())
    monkeypatch.setattr(cluster, "ray_module", lambda: fake)
    with pytest.raises(KeyboardInterrupt):
        with cluster.connect(RayOptions("auto")):
            cluster.track(["task"])
            cluster.track_actor("actor")
            raise KeyboardInterrupt
    assert fake.calls == [("init", "auto"), ("init", "local"), ("cancel", "task"), ("kill", "actor"), ("shutdown",)]
    fake = FakeRay(running={"auto"})  # a cluster runs here: joined, and left running (the driver disconnects)
    monkeypatch.setattr(cluster, "ray_module", lambda: fake)
    with cluster.connect(RayOptions("auto")):
        cluster.track(["done"])
        cluster.untrack(["done"])
    assert fake.calls == [("init", "auto"), ("shutdown",)]
    monkeypatch.setattr(cluster, "ray_module", lambda: FakeRay(running=set()))
    with pytest.raises(UnavailableBackend, match="cannot reach the Ray cluster at head:6379"):
        with cluster.connect(RayOptions("head:6379")):
            pass


def test_connect_reuses_a_running_ray_and_cancels_work_on_ctrl_c(local_ray):
    from onnxprune.scaleout import cluster

    ray = local_ray
    assert cluster.current() is None
    with connected(workers=3) as options:
        assert cluster.current() == options == RayOptions("auto", workers=3)
    assert cluster.current() is None and ray.is_initialized()  # not started here: left running

    @ray.remote
    def sleep() -> None:
        import time

        time.sleep(60)

    with pytest.raises(KeyboardInterrupt):
        with connected():
            ref = sleep.remote()
            cluster.track([ref])
            raise KeyboardInterrupt
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(ref, timeout=30)
    assert ray.is_initialized()


def test_scores_on_ray_are_those_of_one_process(local_ray):
    model = small_net()
    data = load_data("random", model, samples=40)
    blocks, feature = removal_candidates(analyze_model(model), 0), feature_tensor(model)
    alone = score_blocks(model, data, blocks, feature, "cpu", batch=16)
    with connected():
        on_ray = score_blocks(model, data, blocks, feature, "cpu", batch=16)
    assert [s.join for s in on_ray.scores] == [s.join for s in alone.scores]
    assert [s.score for s in on_ray.scores] == pytest.approx([s.score for s in alone.scores], rel=0, abs=SAME)
    assert on_ray.provider == alone.provider == "cpu"


def test_the_keyword_api_takes_a_cluster_address(local_ray, tmp_path, monkeypatch):
    """``onnxprune.score(..., ray="auto")``: the pipeline API reaches the same Ray path as ``--ray``."""
    import onnxprune
    from onnxprune.scaleout import cluster

    onnx.save(small_net(), tmp_path / "net.onnx")
    seen, connect = [], cluster.connect
    monkeypatch.setattr(cluster, "connect", lambda options: seen.append(options) or connect(options))
    on_ray = onnxprune.score(tmp_path / "net.onnx", "random", samples=24, ray="auto")
    alone = onnxprune.score(tmp_path / "net.onnx", "random", samples=24)
    assert seen == [RayOptions("auto")]
    assert [b.score for b in on_ray.blocks] == pytest.approx([b.score for b in alone.blocks], rel=0, abs=SAME)


def test_slp_and_layermerge_plans_are_the_same_with_ray(local_ray, monkeypatch):
    from onnxprune import speedup
    from onnxprune.latency.backends import get_backend
    from tests.latency.test_table import FakeBackend

    model = small_net(1)
    data = load_data("random", model, samples=24)
    feature = feature_tensor(model)
    structure = analyze_model(model)
    options = search_space(structure, conv_l1_norms(to_graph(model)))
    table = build_table(speedup.normalized(model), structure, options, FakeBackend("fake", 1, whole=1e-3, row=5e-5), 2,
                        fingerprint(model), warmup=1, rounds=3)
    # every candidate "measures" 2x: the search keeps the first plan the DP gives for the budget
    monkeypatch.setattr(speedup, "_measure", lambda original, pruned, how, expected_s=None: (1.0, 0.5, 2.0, [[1.0], [0.5]]))

    def plans() -> tuple[dict, list[float]]:
        """(the SLP and LayerMerge plans, the scores behind them)."""
        slp = prune_slp(model, data, feature, TargetOptions(remove_blocks=2), ScoringOptions(provider="cpu"), 8)
        how = speedup.Measurement(get_backend("ort-cpu"), 2)
        merged = speedup.layermerge_to_speedup(model, data, feature, 1.3, how, data_batch=8, table=table).plan
        chosen = {"slp": slp.plan.remove_blocks,
                  **{k: getattr(merged, k) for k in ("remove_blocks", "merge", "drop_convs", "drop_activations")}}
        return chosen, ([h["score"] for h in slp.history] + [s["score"] for s in slp.plan.predicted["scores"]]
                        + [merged.predicted["importance"]])

    alone, alone_scores = plans()
    with connected():
        on_ray, on_ray_scores = plans()
    assert on_ray == alone and alone["slp"] and (alone["remove_blocks"] or alone["merge"] or alone["drop_convs"])
    assert on_ray_scores == pytest.approx(alone_scores, rel=0, abs=SAME)


def _die_once(marker: str) -> None:
    """The first task to get here kills its worker process; the others, and the retry, go on."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def test_a_task_whose_worker_dies_is_retried(local_ray, tmp_path):
    from onnxprune.importance.slp import Copy, share_weights
    from onnxprune.runtime.capture import suffix_model
    from onnxprune.scaleout.scoring import score_on_ray

    ray = local_ray
    model = small_net(2)
    data = load_data("random", model, samples=16)
    feature = feature_tensor(model)
    copies = []
    for block in removal_candidates(analyze_model(model), 0)[:2]:
        suffix, side = suffix_model(model, block.output, [feature])
        copies.append(share_weights(Copy(suffix, {block.output: block.input, **{t: t for t in side}}, feature,
                                         feature), model))
    alone, _ = cka_with_original(model, copies, data, "cpu", batch=8)
    marker = tmp_path / "died"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels by value, not by import
    try:
        with connected(max_retries=2):
            scores = score_on_ray(model, copies, data, "cpu", batch=8, hook=functools.partial(_die_once, str(marker)))
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists()  # a worker died ...
    assert scores.values == pytest.approx(alone, rel=0, abs=SAME)  # ... and its task, run again, scored it
    assert [t.copy for t in scores.tasks] == [0, 1] and all(t.seconds > 0 and t.node for t in scores.tasks)


def test_latency_table_on_two_actors(local_ray, tmp_path, capsys):
    ray = local_ray
    model = small_net(3)
    onnx.save(model, tmp_path / "net.onnx")
    table_path = tmp_path / "table.json"
    placed = ["--ray-resource", RESOURCE] if ray.cluster_resources().get(RESOURCE, 0) >= 2 else []
    # batch 32: at smaller batches the rows of so small a net, timed alone, can add up to more than the whole model
    # 9 rounds: with 3, a busy machine once tipped the rows 5.3% past the whole model and the table was refused
    code = main(["latency", str(tmp_path / "net.onnx"), "--batch", "32", "--rounds", "9", "--threads", "1", "--json",
                 "--quiet", "-o", str(table_path), "--ray", "--ray-workers", "2", *placed])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(json.loads(out.out)["timed_on"]) == 2
    table = load_table(table_path, fingerprint(model))  # saved with timed_on, and read back
    assert set(table.timed_on) == set(table.rows) | {f"block {join}" for join in table.blocks}
    assert len(set(table.timed_on.values())) == 2  # both actors timed rows
    structure = analyze_model(model)
    originals = [o for o in search_space(structure, conv_l1_norms(to_graph(model))) if o.original]
    predicted = table.predict(originals, structure)
    if table.fixed_s > 0:  # the table predicts the original exactly, as in one process
        assert predicted == pytest.approx(table.whole_s, rel=1e-9)
    else:  # a fixed part below zero, within the tolerance, is clamped to 0 (latency.table.fixed_part)
        assert any("clamped" in note for note in table.notes)
    old = json.loads(table_path.read_text())
    del old["timed_on"]  # a table saved before the field existed still loads
    table_path.write_text(json.dumps(old))
    assert load_table(table_path, fingerprint(model)).timed_on == {}


def test_latency_actors_need_a_node_with_the_resource(local_ray, tmp_path, capsys):
    onnx.save(small_net(), tmp_path / "net.onnx")
    assert main(["latency", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "t.json"), "--quiet", "--ray",
                 "--ray-resource", "no_such_device"]) == 3
    assert "no node of the Ray cluster offers the resource 'no_such_device'" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_groups_split_so_every_actor_gets_work():
    pytest.importorskip("ray")
    from onnxprune.scaleout.latency import actor_count, finer

    pieces = finer([list("abcdefghij"), ["block x", "block y"]], 2)
    assert sorted(sum(pieces, [])) == sorted(list("abcdefghij") + ["block x", "block y"])
    assert len(pieces) >= 2 and [len(p) for p in pieces] == sorted((len(p) for p in pieces), reverse=True)
    assert finer([["a"]], 4) == [["a"]]
    assert actor_count(4, None, {"CPU": 2.0}) == 2 and actor_count(2, "jetson", {"CPU": 8, "jetson": 3}) == 2
    with pytest.raises(Exception, match="offers the resource 'jetson'"):
        actor_count(2, "jetson", {"CPU": 8})
