"""Importance rows on Ray (docs/scale-out.md, "score and prune"): ``runtime.compare.cka_with_original`` with one
Ray task per modified copy, used when a run is connected to a cluster (``cluster.connect``).

The original runs once, here, on the batches ``plan_scoring`` chooses, so that every batch holds the samples it
holds in a single process. Each tensor a copy reads from a batch (captured from the original, or a data input such
as an attention mask) goes into the object store once, as does each initializer the copies share with the original
(``compare.share_weights`` left them out of the copies). A task is given the ObjectRefs it needs nested in a list of
dicts, so that Ray hands them over as references instead of resolving them into every call's arguments, and fetches
them batch by batch (zero-copy on the node that holds them). It rebuilds its copy with the shared initializers,
creates its session, accumulates CKA over the batches in the same order with the same code as a single process
(``compare.copy_rows``, ``similarity.cka.accumulator``; docs/algorithms.md section 1) and returns the value with how
long it took and where it ran. A task whose worker process dies runs again, ``RayOptions.max_retries`` times at most.

The scores are those of a single process up to the rounding of CKA's float64 sums
(tests/scaleout/test_scaleout.py: within 1e-12, the same plans). The copies' outputs are the same floats on the same kind of CPU (same batches, same
onnxruntime kernels; a session's thread count does not change them), but numpy's OpenBLAS splits the sums CKA
accumulates (X^T X, the norms) across its threads, and a task has one (Ray sets OMP_NUM_THREADS to the task's CPUs)
where a process on this 2-core machine has two: ulp-sized differences (benchmarks/RESULTS.md, "Scale-out on Ray"), as
one process run with OPENBLAS_NUM_THREADS=1 and =2 differs from itself. Further apart: a
node with another CPU (other kernels: float32 rounding of the features), and a single process without the memory for
every copy's session and without disk to spill to, which runs the original once per group of copies, each run
capturing only its group's tensors (onnxruntime may then fuse nodes differently).
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import ray

from onnxprune import progress
from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.runtime.capture import with_outputs
from onnxprune.runtime.compare import Copy, _captured, _ModelFiles, copy_rows, plan_scoring, token_mask
from onnxprune.runtime.session import create_session
from onnxprune.scaleout import cluster
from onnxprune.similarity.cka import accumulator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskRecord:
    """One copy's task: how long it ran inside (fetches, session, scoring) and where."""

    copy: int  # the copy's index
    seconds: float
    node: str  # Ray's node id
    host: str
    pid: int  # the worker process (a retried task shows the pid of its last try)
    started: float  # wall clock of the node (time.time()) when the task started and ended
    ended: float


@dataclass
class Staged:
    """What the tasks read: per batch, the ObjectRef of every tensor the copies read; the shared initializers'."""

    batches: list[dict[str, ray.ObjectRef]]
    counts: list[int]  # samples in each batch (a padded static batch holds more rows)
    shared: dict[str, ray.ObjectRef]  # initializer name -> its serialized TensorProto
    mask: str | None  # the attention mask input (compare.token_mask)
    seconds: float  # running the original and putting its tensors


@dataclass
class RayScores:
    values: list[float]  # CKA of every copy, in order
    provider: str  # the providers the tasks' sessions got ("cpu", or e.g. "cpu+cuda" on a mixed cluster)
    tasks: list[TaskRecord]  # in the copies' order
    staging_s: float
    wall_s: float  # staging and every task, as this process waited for them


def cka_on_ray(original: onnx.ModelProto, copies: list[Copy], data: Dataset, provider: str = "auto", batch: int = 64,
               unbiased: bool = False, memory_budget: int | None = None,
               spill_dir: str | None = None) -> tuple[list[float], str]:
    """What ``cka_with_original`` returns, computed by Ray tasks (and logged: each task's duration and node)."""
    scores = score_on_ray(original, copies, data, provider, batch, unbiased, memory_budget, spill_dir)
    for task in scores.tasks:
        log.debug(f"ray: copy {task.copy} scored in {task.seconds:.3f} s on {task.host} (node {task.node[:8]}, "
                  f"pid {task.pid})")
    log.info(summary(scores))
    return scores.values, scores.provider


def summary(scores: RayScores) -> str:
    """One line: the tasks' durations and the hosts that ran them."""
    seconds = [t.seconds for t in scores.tasks]
    hosts = Counter(t.host for t in scores.tasks)
    return (f"ray: scored {len(seconds)} copies in {scores.wall_s:.1f} s (original and object store "
            f"{scores.staging_s:.1f} s); tasks took {statistics.median(seconds):.2f} s at the median, "
            f"{max(seconds):.2f} s at most; on {', '.join(f'{h} ({n})' for h, n in sorted(hosts.items()))}")


def score_on_ray(original: onnx.ModelProto, copies: list[Copy], data: Dataset, provider: str = "auto",
                 batch: int = 64, unbiased: bool = False, memory_budget: int | None = None,
                 spill_dir: str | None = None, hook: Callable[[], None] | None = None) -> RayScores:
    """Every copy's CKA with its reference tensor, one Ray task per copy; ``hook``: called first in every task
    (tests inject a dying worker with it)."""
    options = cluster.current()
    if options is None:
        raise OnnxPruneError("scoring on Ray needs a connected cluster (onnxprune.scaleout.cluster.connect)")
    clock = time.perf_counter()
    staged = stage(original, copies, data, provider, batch, unbiased, memory_budget, spill_dir)
    refs = [submit(staged, c, i, provider, unbiased, options.max_retries, hook) for i, c in enumerate(copies)]
    cluster.track(refs)
    results: dict[int, tuple] = {}
    position = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    for _ in progress.progress(range(len(refs)), total=len(refs), desc=f"scoring {len(refs)} candidate(s) on Ray"):
        done, pending = ray.wait(pending, num_returns=1)
        results[position[done[0]]] = ray.get(done[0])
        cluster.untrack(done)
    values = [results[i][0] for i in range(len(copies))]
    used = sorted({results[i][1] for i in range(len(copies))})
    return RayScores(values, "+".join(used), [results[i][2] for i in range(len(copies))], staged.seconds,
                     time.perf_counter() - clock)


def stage(original: onnx.ModelProto, copies: list[Copy], data: Dataset, provider: str = "auto", batch: int = 64,
          unbiased: bool = False, memory_budget: int | None = None, spill_dir: str | None = None) -> Staged:
    """Run the original once on the batches ``plan_scoring`` chooses and put what the copies read into the object
    store: every tensor of every batch once, and every initializer the copies share once."""
    clock = time.perf_counter()
    size = plan_scoring(original, copies, data, batch, unbiased, memory_budget, spill_dir).batch
    mask = token_mask(original, data)
    captured = _captured(copies, data)
    wanted = {name for c in copies for name in (c.reference, *c.feeds.values())} | ({mask} if mask else set())
    initializers = {t.name: t for t in original.graph.initializer}
    shared = {name: ray.put(initializers[name].SerializeToString())
              for name in dict.fromkeys(n for c in copies for n in c.shared)}
    batches, counts = [], []
    with tempfile.TemporaryDirectory(prefix="onnxprune-scoring-", dir=spill_dir) as folder:
        files = _ModelFiles(Path(folder), original)
        full = create_session(files.write(with_outputs(original, captured), owned=True), provider, arena=False)
        for feeds, _, count in progress.batches(data, size, "capturing activations into Ray's object store"):
            outs = {**feeds, **dict(zip(full.output_names, full.run(feeds)))}
            batches.append({name: ray.put(outs[name]) for name in sorted(wanted)})
            counts.append(count)
            del outs
    if not batches:
        raise OnnxPruneError("no calibration data to score with")
    return Staged(batches, counts, shared, mask, time.perf_counter() - clock)


def submit(staged: Staged, copy: Copy, index: int, provider: str, unbiased: bool, max_retries: int,
           hook: Callable[[], None] | None = None) -> ray.ObjectRef:
    """Start the task that scores ``copy`` (the ``index``-th): it gets only the ObjectRefs it reads."""
    names = sorted({copy.reference, *copy.feeds.values()} | ({staged.mask} if staged.mask else set()))
    batches = [{name: b[name] for name in names} for b in staged.batches]
    shared = {name: staged.shared[name] for name in copy.shared}
    # a task that asks for no GPU sees none (Ray hides them): one GPU per task for a GPU provider
    task = _score_copy.options(max_retries=max_retries, num_gpus=1 if provider in ("cuda", "tensorrt") else 0)
    return task.remote(index, copy, shared, batches, staged.counts, staged.mask, provider, unbiased, hook)


@ray.remote(num_cpus=1)
def _score_copy(index: int, copy: Copy, shared: dict, batches: list[dict], counts: list[int], mask: str | None,
                provider: str, unbiased: bool, hook: Callable[[], None] | None) -> tuple[float, str, TaskRecord]:
    """(the copy's CKA over every batch, its session's provider, the task's record); the session gets the CPUs
    Ray gave the task (1 by default) as onnxruntime threads."""
    started, clock = time.time(), time.perf_counter()
    if hook is not None:
        hook()
    context = ray.get_runtime_context()
    model = onnx.ModelProto()
    model.CopyFrom(copy.model)
    names = list(shared)
    model.graph.initializer.extend(onnx.TensorProto.FromString(b) for b in ray.get([shared[n] for n in names]))
    threads = max(1, int(context.get_assigned_resources().get("CPU", 1)))
    session = create_session(model, provider, threads=threads, arena=False)
    del model
    cka = None
    for refs, count in zip(batches, counts):
        outs = dict(zip(refs, ray.get(list(refs.values()))))
        kept = outs[mask] if mask else None
        reference, got = copy_rows(copy, session, outs, count, kept)
        if cka is None:
            cka = accumulator(reference.shape[1], unbiased)
        cka.update(reference, got)
        del outs
    record = TaskRecord(index, time.perf_counter() - clock, context.get_node_id(), socket.gethostname(), os.getpid(),
                        started, time.time())
    return cka.value(), session.provider, record
