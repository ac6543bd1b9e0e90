"""Latency rows on Ray actors (docs/scale-out.md, "latency"): ``latency.table.time_groups`` when a run is connected
to a cluster (``cluster.connect``).

Each actor is a ``GroupTimer`` built where it runs: the whole model (put into the object store once) on the backend
named by the run, placed on a node with the custom resource ``RayOptions.resource`` when one is given (edge devices
join the cluster labelled with it). The groups of rows ``build_table`` makes are split finer, so that every actor
gets work, and dealt round-robin, largest first; every actor times the whole model beside its own rows, so a row's
share is always a share of the whole model on the same device (docs/algorithms.md section 4.3), and the table keeps
shares times the median whole as in one process. ``LatencyTable.timed_on`` says which actor timed which row. An
actor whose process dies is restarted, and its group timed again, ``RayOptions.max_retries`` times at most.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable

import numpy as np
import onnx
import ray

from onnxprune.errors import UnavailableBackend
from onnxprune.latency.backends import Backend, default_threads, get_backend
from onnxprune.latency.table import GroupTimer, GroupTimes, TimedRow
from onnxprune.scaleout import cluster

log = logging.getLogger(__name__)
IN_FLIGHT = 2  # groups queued on one actor at a time: the rest of the row models wait here, not in the object store
# actors that need a GPU ("torch" on an actor without one is torch-cpu)
GPU_BACKENDS = frozenset({"ort-cuda", "ort-tensorrt", "tensorrt", "torch-cuda"})


class PlacedTimer(GroupTimer):
    """A GroupTimer that says which host, Ray node and actor it times on."""

    def where(self) -> str:
        context = ray.get_runtime_context()
        return (f"{socket.gethostname()} (node {context.get_node_id()[:8]}, actor {context.get_actor_id()[:8]}): "
                f"{self.backend.device}")


class ActorTimer:
    """A Ray actor's GroupTimer, built on first use from what travels: the backend by name and threads, and the whole
    model serialized, its ObjectRef nested in a list (``whole``) and passed with every call, so that an actor
    restarted after its process died builds it again (constructor arguments stay small: none in the object store)."""

    def __init__(self, backend: str, threads: int | None, cache_dir: str | None, batch: int, rounds: int,
                 warmup: int) -> None:
        self.backend, self.threads, self.cache_dir = backend, threads, cache_dir
        self.batch, self.rounds, self.warmup = batch, rounds, warmup
        self.timer: PlacedTimer | None = None

    def _ready(self, whole: list) -> PlacedTimer:
        if self.timer is None:
            self.timer = PlacedTimer(ray.get(whole[0]), get_backend(self.backend, self.threads, self.cache_dir),
                                     self.batch, self.rounds, self.warmup)
        return self.timer

    def time(self, whole: list, rows: list[TimedRow]) -> tuple[float, list[float], str]:
        return self._ready(whole).time(rows)

    def whole_seconds(self, whole: list) -> float:
        return self._ready(whole).whole_seconds()

    def node_overhead(self, whole: list) -> float:
        return self._ready(whole).node_overhead()

    def describe(self, whole: list) -> dict:
        return self._ready(whole).describe()


_RemoteTimer = ray.remote(ActorTimer)


def time_groups_on_ray(model: onnx.ModelProto, backend: Backend, groups: list[list[str]],
                       build: Callable[[str], TimedRow], batch: int, rounds: int, warmup: int) -> GroupTimes:
    """What ``time_groups`` returns, the groups timed by Ray actors (``timed_on`` filled)."""
    options = cluster.current()
    gpus = 1 if backend.name in GPU_BACKENDS else 0  # an actor that asks for no GPU sees none (Ray hides them)
    count = actor_count(options.workers, options.resource, ray.cluster_resources(), gpus)
    placement = {"resources": {options.resource: 1}} if options.resource else {}
    whole = ray.put(model.SerializeToString())
    # --threads applies on every actor; without it (the backend has this machine's cores) each uses its node's
    threads = None if backend.threads == default_threads() else backend.threads
    actors = [_RemoteTimer.options(num_cpus=1, num_gpus=gpus, max_restarts=options.max_retries,
                                   max_task_retries=options.max_retries, **placement)
              .remote(backend.name, threads, backend.cache_dir, batch, rounds, warmup) for _ in range(count)]
    for actor in actors:
        cluster.track_actor(actor)
    try:
        return _time_on(actors, [whole], finer(groups, count), build)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
            cluster.untrack_actor(actor)


def _time_on(actors: list, whole: list, groups: list[list[str]], build: Callable[[str], TimedRow]) -> GroupTimes:
    """Deal ``groups`` round-robin to ``actors``, at most IN_FLIGHT queued on each, and gather what they time
    (``whole``: the whole model's ObjectRef in a list)."""
    queues = [groups[i::len(actors)] for i in range(len(actors))]
    running: dict = {}  # ObjectRef -> (actor index, the group's keys)

    def submit(i: int) -> None:
        if queues[i]:
            keys = queues[i].pop(0)
            rows = [TimedRow(row.key, _serialized(row.model), row.feeds) for row in map(build, keys)]
            running[actors[i].time.remote(whole, rows)] = (i, keys)

    for i in range(len(actors)):
        for _ in range(IN_FLIGHT):
            submit(i)
    shares, wholes, timed_on = {}, [], {}
    total = sum(map(len, groups))
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        i, keys = running.pop(done[0])
        whole_s, own, where = ray.get(done[0])
        wholes.append(whole_s)
        shares.update((key, seconds / whole_s) for key, seconds in zip(keys, own))
        timed_on.update((key, where) for key in keys)
        log.info(f"latency: timed {len(shares)}/{total} rows and blocks on Ray ({where})")
        submit(i)
    described = ray.get([a.describe.remote(whole) for a in actors])
    backend = dict(described[0])
    devices = list(dict.fromkeys(d["device"] for d in described))
    backend["device"] = "; ".join(devices)
    whole_s = float(np.median(wholes)) if wholes else ray.get(actors[0].whole_seconds.remote(whole))
    return GroupTimes(shares, whole_s, ray.get(actors[0].node_overhead.remote(whole)), timed_on, backend)


def _serialized(model: onnx.ModelProto | bytes) -> bytes:
    return model if isinstance(model, bytes) else model.SerializeToString()


def actor_count(workers: int, resource: str | None, resources: dict, gpus: int = 0) -> int:
    """How many latency actors the cluster can hold at once: ``workers``, at most one per unit of ``resource`` (when
    given), else one per CPU, and one per GPU when each needs ``gpus``. None at all is UnavailableBackend (exit
    status 3): an actor asking for what no node has would wait for ever."""
    name = resource or "CPU"
    have = int(resources.get(name, 0))
    if have < 1:
        raise UnavailableBackend(f"no node of the Ray cluster offers the resource {name!r}: join the device with "
                                 f"ray start --address=HEAD:6379 --resources='{{\"{name}\": 1}}' (docs/scale-out.md)")
    if gpus:
        have = min(have, int(resources.get("GPU", 0)) // gpus)
        if have < 1:
            raise UnavailableBackend("the latency backend needs a GPU and no node of the Ray cluster has one (start "
                                     "GPU nodes with ray start --num-gpus N)")
    if workers > have:
        log.info(f"ray: {have} latency actor(s), not {workers}: the cluster has {have} {name}")
    return min(workers, have)


def finer(groups: list[list[str]], parts: int) -> list[list[str]]:
    """``groups`` split so that there are at least ``parts`` (each group into a number of pieces in proportion to
    its size), largest first: dealt round-robin, every actor gets work and the work is near even."""
    total = sum(map(len, groups))
    pieces = []
    for group in groups:
        n = min(len(group), max(1, math.ceil(parts * len(group) / max(total, 1))))
        size = math.ceil(len(group) / n)
        pieces += [group[k:k + size] for k in range(0, len(group), size)]
    return sorted(pieces, key=len, reverse=True)
