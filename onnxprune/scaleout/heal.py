"""Healing on Ray Train (``--ray``; docs/scale-out.md, "Healing across machines"): ``heal_on_ray`` keeps the
contract of ``onnxprune.train.heal.heal`` (the same loss, schedule, split, held-back evaluations and record; the
best checkpoint by held-back KL written back into the ONNX graph, names and structure unchanged), but the steps
run data-parallel on ``RayOptions.workers`` Ray Train workers (``TorchTrainer``: gloo on CPUs, NCCL on GPUs).

What goes where:

- The driver (the caller's process) checks and prepares the run as ``heal`` does (``train.heal.prepare``): the
  split, the step count, and the teacher's outputs that never change, computed once with onnxruntime: on the
  held-back samples, and on the whole data set when nothing is augmented. These, the data set and the two models
  go to the workers through the object store (``ray.put``: one copy per machine, not one per worker).
- Every worker draws the same *whole* batch at every step (the same seeded generator, the same augmentation and
  mixup) and trains on its contiguous slice of it, rank r on rows [r b/N, (r+1) b/N). The teacher's outputs for
  the slice are sliced from the cache, or (with augmentation, where they change every step) computed by the
  worker on its slice: the teacher's work is split as the student's is, and nothing per step crosses the
  network but the gradients and the loss. The loss's scales (the teacher's mean square at the feature map, and
  at the logits when they are no (batch, classes) pair) are averaged over the workers, so they are the whole
  batch's; every term of the loss is a mean over the slice, and DistributedDataParallel averages the gradients,
  so N workers take the step that one process takes on the whole batch, up to float rounding. That needs a batch
  divisible by N (refused otherwise) and a graph that treats the samples of a batch independently: the trainable
  copy keeps BatchNormalization in its inference form (no batch statistics), so exported classifiers do.
- Rank 0 evaluates on the held-back samples at the evaluation points and keeps the best checkpoint; after each
  evaluation it leaves everything a restart needs (weights, optimiser, schedule, the generator's state, the
  history) with a small actor owned by the driver. A worker that dies fails the attempt; Ray Train starts a new
  worker group (``FailureConfig(max_failures=RayOptions.max_retries)``) and every new worker resumes from the
  last evaluation, drawing the batches it would have drawn, so a retried run ends with the weights of a run
  that never failed. The actor, not a Ray Train checkpoint on ``RunConfig(storage_path)``, carries the state
  because it reaches the driver from any machine without storage that every machine shares.
- Only once the trainer has finished does the driver write the best weights back into the model: a failed run
  raises and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import torch

from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.options import HealingOptions
from onnxprune.runtime.capture import with_outputs
from onnxprune.runtime.session import create_session
from onnxprune.train.bridge import GraphModule
from onnxprune.train.heal import HealingDiverged, HealLoop, HealResult, HealSetup, _heal_outputs, _tensor, \
    heal_result, prepare

log = logging.getLogger(__name__)

# A testing hook (tests/scaleout/test_heal.py): "RANK:STEP:MARKER" in the driver's environment makes worker RANK
# exit abruptly before step STEP unless the file MARKER exists (it creates it first), to check that a lost worker
# is retried.
KILL_WORKER_ENV = "ONNXPRUNE_TEST_KILL_WORKER"


def heal_on_ray(student_model: onnx.ModelProto, teacher_model: onnx.ModelProto, data: Dataset,
                options: HealingOptions, ray_options, provider: str = "auto") -> HealResult:
    """``onnxprune.train.heal.heal`` on ``ray_options.workers`` Ray Train workers (module docstring), retried up to
    ``ray_options.max_retries`` times when a worker fails. Ray must be initialised (``ray.init`` or the CLI's
    ``connect``). The record is heal's, with ``"ray": True``, ``"workers"``, ``"restarts"`` (attempts after the
    first), ``"fit_seconds"`` (the trainer's wall time, worker start-up included) and ``seconds_per_step`` (the
    median step of rank 0, the gradient exchange included)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = time.perf_counter()
    workers, retries = int(ray_options.workers), int(ray_options.max_retries)
    if workers < 1:
        raise OnnxPruneError(f"healing on Ray needs at least one worker, not {workers}")
    if not ray.is_initialized():
        raise OnnxPruneError("healing on Ray needs a connection to a Ray cluster first (ray.init, or --ray)")
    outputs_s, outputs_t = _heal_outputs(student_model, teacher_model, options)
    student = GraphModule(student_model, outputs_s)  # refuses what it cannot train before anything is shipped
    teacher = create_session(with_outputs(teacher_model, outputs_t), provider)
    setup = prepare(teacher_model, teacher, data, options, outputs_s, outputs_t)
    del teacher
    _check_shardable(setup, data, workers)
    _check_resources(ray, options, workers)

    log.info(f"heal: on Ray, {workers} worker{'s' * (workers > 1)} ({options.device}) of {setup.batch // workers} "
             f"samples a step; {len(setup.split.train)} samples to train on, {len(setup.split.held_back)} held back; "
             f"{setup.steps} steps of {setup.batch}")
    # beside the driver (when it can be): what it holds outlives a lost worker machine
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    mailbox = ray.remote(num_cpus=0, scheduling_strategy=here)(_Mailbox).remote()
    storage = tempfile.mkdtemp(prefix="onnxprune-ray-heal-")  # Ray Train's run folder; nothing of ours goes there
    try:
        config = {"setup": ray.put(setup), "data": ray.put(data), "options": options, "provider": provider,
                  "student": ray.put(student_model.SerializeToString()), "mailbox": mailbox,
                  # the workers run the teacher only when the inputs change at every step (augmentation)
                  "teacher": None if setup.cached is not None else ray.put(teacher_model.SerializeToString()),
                  "kill": os.environ.get(KILL_WORKER_ENV)}
        trainer = TorchTrainer(
            _train_worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=options.device == "cuda"),
            run_config=RunConfig(name="onnxprune-heal", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=retries)))
        fit_started = time.perf_counter()
        try:
            with _interrupt_aborts(trainer):
                trainer.fit()
        except TrainingFailedError as error:
            raise OnnxPruneError(f"healing on Ray failed ({retries} retr{'y' if retries == 1 else 'ies'} allowed, "
                                 f"RayOptions.max_retries): {error}") from error
        fit_seconds = time.perf_counter() - fit_started
        state, starts = ray.get(mailbox.get.remote())
    finally:
        ray.kill(mailbox)
        shutil.rmtree(storage, ignore_errors=True)
    if state is not None and "error" in state:
        raise HealingDiverged(state["error"])
    if state is None or not state["done"]:
        raise OnnxPruneError("healing on Ray: the workers finished without handing back the healed weights")
    loop = state["loop"]
    result = heal_result(student_model, student, setup, options, loop["history"], loop["best"], state["device"],
                         started, loop["step_seconds"])
    result.record.update({"ray": True, "workers": workers, "restarts": starts - 1, "fit_seconds": fit_seconds})
    log.info(f"heal: on Ray, {setup.steps} steps in {fit_seconds:.0f} s ({starts - 1} restart"
             f"{'s' * (starts != 2)}), median step {result.record['seconds_per_step'] * 1e3:.0f} ms")
    return result


def _check_shardable(setup: HealSetup, data: Dataset, workers: int) -> None:
    """Every worker trains on an equal slice of every batch: refuse a batch that does not split so."""
    if workers == 1:
        return
    if data.static_batch:
        raise OnnxPruneError(f"the model takes batches of exactly {data.static_batch} (a fixed batch dimension): "
                             f"they cannot be split among {workers} workers; heal it with one worker, or export "
                             f"it with a dynamic batch")
    if setup.batch % workers:
        raise OnnxPruneError(f"a batch of {setup.batch} does not split evenly among {workers} workers (each trains "
                             f"on an equal slice of every batch, so that the steps are those of one process): give "
                             f"a --heal-batch that is a multiple of {workers}")


def _check_resources(ray, options: HealingOptions, workers: int) -> None:
    """Warn when the cluster, as it is now, lacks a CPU (a GPU with --device cuda) for every worker: Ray Train then
    waits until an autoscaler adds them."""
    kind = "GPU" if options.device == "cuda" else "CPU"
    have = ray.cluster_resources().get(kind, 0)
    if have < workers:
        log.warning(f"heal: the Ray cluster has {have:g} {kind}s for {workers} workers of one {kind} each: the run "
                    f"waits until there are enough")


@contextlib.contextmanager
def _interrupt_aborts(trainer) -> Iterator[None]:
    """Ctrl-C during ``trainer.fit()`` aborts the run on the cluster and raises KeyboardInterrupt here, and the
    caller's SIGINT handler is back afterwards. (Ray Train's own handler, which ``fit`` sets and never takes back,
    waits for the abort and then exits the process with status 0, also on a Ctrl-C long after healing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # fit sets no handler off the main thread
        return
    previous = signal.getsignal(signal.SIGINT)

    def register(controller) -> None:
        def interrupted(signum, frame):
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            controller.abort.remote()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupted)

    trainer._register_sigint_handler = register  # DataParallelTrainer's hook (Ray Train V2)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be set back
            signal.signal(signal.SIGINT, previous)


class _Mailbox:
    """A Ray actor of the driver's (``ray.remote`` is applied where it is created): what a restarted worker group
    resumes from, then the result. Rank 0 counts the attempts."""

    def __init__(self) -> None:
        self.state: dict | None = None
        self.starts = 0

    def resume(self, first: bool) -> dict | None:
        self.starts += first
        return self.state

    def put(self, state: dict) -> None:
        self.state = state

    def get(self) -> tuple[dict | None, int]:
        return self.state, self.starts


def _train_worker(config: dict) -> None:
    """One Ray Train worker's run (module docstring)."""
    import ray
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    # the arrays that come out of the object store are read-only: torch.from_numpy warns, but nothing writes them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    options: HealingOptions = config["options"]
    mailbox = config["mailbox"]
    device = ray.train.torch.get_device() if options.device == "cuda" else torch.device("cpu")
    torch.manual_seed(options.seed)
    setup: HealSetup = ray.get(config["setup"])
    data: Dataset = ray.get(config["data"])
    student = GraphModule(onnx.load_from_string(ray.get(config["student"])), setup.outputs_s).to(device)
    if setup.channels_last:
        student = student.to(memory_format=torch.channels_last)
    teacher = None
    if config["teacher"] is not None:
        teacher_model = onnx.load_from_string(ray.get(config["teacher"]))
        teacher = create_session(with_outputs(teacher_model, setup.outputs_t), config["provider"])
    share = setup.batch // world
    part = slice(rank * share, (rank + 1) * share)

    loop = HealLoop(student, setup, options, device, mean=_mean_over_workers(world, device) if world > 1 else None)
    rng = np.random.default_rng(options.seed)
    saved = ray.get(mailbox.resume.remote(rank == 0))
    if saved is not None:  # a restart: go on from the last evaluation
        loop.load_state_dict(saved["loop"])
        rng.bit_generator.state = saved["rng"]
        first = saved["step"] + 1
    else:
        first = 1
        if rank == 0:
            loop.begin()
    if world > 1:
        _freeze_unused(student, data, setup, world, device)
        # the graph's constants are buffers, alike on every worker: no need to send them at every step
        quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else {"broadcast_buffers": False}
        loop.forward = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                               **quiet)
    kill = _kill_hook(config["kill"], rank)

    for step in range(first, setup.steps + 1):
        if kill is not None and kill[0] == step and not os.path.exists(kill[1]):
            open(kill[1], "w").close()
            os._exit(1)
        try:
            loop.step(step, data, rng, teacher, part)
        except HealingDiverged as error:  # every worker sees the same (averaged) loss: all stop here, no retry
            if rank == 0:
                ray.get(mailbox.put.remote({"error": str(error)}))
            return
        if rank != 0:
            continue
        if loop.due(step):
            loop.evaluation(step)
            # on the CPU: the driver may have no GPU, and a restarted worker loads it onto its own device
            ray.get(mailbox.put.remote({"step": step, "rng": rng.bit_generator.state, "done": step == setup.steps,
                                        "loop": _on_cpu(loop.state_dict()), "device": device.type}))
        else:
            loop.progress_line(step)


def _mean_over_workers(world: int, device: torch.device):
    import torch.distributed as dist

    def mean(value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor) / world

    return mean


def _freeze_unused(student: GraphModule, data: Dataset, setup: HealSetup, world: int, device: torch.device) -> None:
    """Stop the parameters that get no gradient (those the matched outputs do not need, a Resize's scales, ...)
    from requiring one: DistributedDataParallel waits for a gradient of every parameter that requires one, and in
    ``heal`` these never change either. Found with one backward pass over a slice's worth of samples."""
    rows = setup.split.train[:max(1, setup.batch // world)]
    feeds = {k: _tensor(data.inputs[k][rows], device, setup.layout) for k in setup.input_names}
    outputs = [o for o in student(feeds) if o.requires_grad]
    if outputs:
        sum(o.float().sum() for o in outputs).backward()
    for parameter in student.parameters():
        if parameter.grad is None:
            parameter.requires_grad_(False)
        parameter.grad = None


def _on_cpu(value):
    """``value`` (dicts and lists of tensors and other things) with its tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _kill_hook(spec: str | None, rank: int) -> tuple[int, str] | None:
    if not spec:
        return None
    who, step, marker = spec.split(":", 2)
    return (int(step), marker) if int(who) == rank else None
