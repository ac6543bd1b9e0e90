"""Latency backends behind one interface: each times a model at given inputs, after warm-up, as the
median of repeated runs, with its thread count fixed and reported.

- ``ort-cpu``: onnxruntime on the CPU (the default; the one tested without a GPU);
- ``ort-cuda``: onnxruntime's CUDA provider, inputs and outputs bound on the device (IO binding);
- ``ort-tensorrt``: onnxruntime's TensorRT provider, engine and timing caches on;
- ``tensorrt``: the TensorRT Python API (builder with a shared timing cache, execute_async_v3,
  CUDA events through torch's CUDA runtime). Imported lazily.
- ``torch`` (CUDA when torch sees a GPU, else the CPU), ``torch-cpu``, ``torch-cuda``: the model's trainable torch
  copy (``onnxprune.train.bridge``) in eval mode without autograd, as PyTorch-eager speed-ups (LayerMerge's own
  figures) are measured; on CUDA timed by CUDA events, inputs on the device. Needs the torch extra.

A backend that cannot run on this machine raises ``BackendUnavailable`` saying why; the provider
a session really got is checked, never assumed (onnxruntime-gpu silently falls back to the CPU).

Two ways to run a model: ``runner`` (the whole run, as a user's call sees it) and ``own_clock`` (the
model's own work only, for a LayerMerge row timed alone). A row timed alone pays costs that the
whole network pays once, not per conv: the call itself, and on ``ort-cpu`` the conversions into and
out of onnxruntime's blocked NCHWc layout, which cost as much as a small conv (measured on the
shipped MobileNetV2, rows timed by wall clock summed to about twice the whole model; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxprune.errors import MissingDependency, OnnxPruneError, UnavailableBackend
from onnxprune.runtime.session import create_session, session_options

BACKENDS = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt", "torch", "torch-cpu", "torch-cuda")
# onnxruntime's CPU layout conversions: inside a network they happen once at its ends, not per conv.
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})


class BackendUnavailable(UnavailableBackend):
    """The backend cannot run here (no GPU, no tensorrt, no CUDA provider): exit status 3."""


@dataclass
class Backend:
    name: str
    threads: int | None
    device: str = ""
    versions: dict = field(default_factory=dict)
    cache_dir: str | None = None

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "threads": self.threads, "versions": self.versions}

    def runner(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
        """A callable that runs ``model`` once on ``feeds`` and waits for the result."""
        if self.name == "tensorrt":
            return _tensorrt_runner(model, feeds, self.cache_dir)
        if self.name.startswith("torch"):
            return _torch_runner(model, feeds, "cuda" if self.name == "torch-cuda" else "cpu", self.threads)
        provider = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt"}[self.name]
        if provider == "cpu":
            session = create_session(model, "cpu", threads=self.threads)
            return lambda: session.run(feeds)
        return _ort_gpu_runner(model, feeds, provider, self.cache_dir)

    def own_clock(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> OwnClock:
        """A clock of the model's own work: on ``ort-cpu`` the kernels onnxruntime's profiler times,
        layout conversions left out; elsewhere the run minus that of an identity model on the same input."""
        if self.name == "ort-cpu":
            return ProfiledClock(model, feeds, self.threads)
        empty = overhead_model(feeds)
        return OverheadClock(self.runner(model, feeds), self.runner(empty, {"x": next(iter(feeds.values()))}))

    def reference_runner(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
        """A run of the whole model under the conditions of ``own_clock``: rows are timed as shares of it.
        On ``ort-cpu`` the profiler is on (it adds time to every node it times: benchmarks/RESULTS.md), elsewhere
        the plain run."""
        if self.name == "ort-cpu":
            return ProfiledClock(model, feeds, self.threads)
        return self.runner(model, feeds)

    def time(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], warmup: int = 5, repeats: int = 20) -> float:
        """Median seconds of one run."""
        run = self.runner(model, feeds)
        return median_time(run, warmup, repeats)


class OwnClock:
    """Runs a model once per call; ``seconds()`` gives the model's own seconds for every call so far,
    and ends the clock."""

    def __call__(self) -> None:
        raise NotImplementedError

    def seconds(self) -> list[float]:
        raise NotImplementedError


_PROFILES = itertools.count()


class ProfiledClock(OwnClock):
    """onnxruntime CPU session with its profiler on: a run's own time is the sum of its kernels' times. It keeps
    each run's wall time too, so that ``node_shares`` can read what each graph node takes of a run."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int | None):
        # onnxruntime adds the start time in milliseconds: clocks made within one need a name of their own
        prefix = os.path.join(tempfile.gettempdir(), f"onnxprune-profile-{os.getpid()}-{next(_PROFILES)}")
        self.session = create_session(model, "cpu", threads=threads, profile=prefix).session
        self.model = model
        self.feeds = feeds
        self.walls: list[float] = []
        self.events: list[dict] | None = None

    @property
    def runs(self) -> int:
        return len(self.walls)

    def __call__(self) -> None:
        if self.events is not None:
            raise OnnxPruneError("a profiled clock runs no more once its profile was read")
        start = time.perf_counter()
        self.session.run(None, self.feeds)
        self.walls.append(time.perf_counter() - start)

    def _profile(self) -> list[dict]:
        if self.events is None:
            path = self.session.end_profiling()
            try:
                self.events = json.loads(Path(path).read_text())
            finally:
                os.remove(path)
        return self.events

    def seconds(self) -> list[float]:
        return kernel_seconds(self._profile(), self.runs)

    def node_shares(self) -> dict[str, float]:
        """Graph node name -> the median over runs of the share of the run's wall time its kernels take
        (``kernel_node_shares``)."""
        return kernel_node_shares(self._profile(), self.walls, self.model)


def _kernels(events: list[dict]) -> Iterator[tuple[str, float]]:
    """(kernel name, seconds) of every kernel run in an onnxruntime profile, layout conversions left out."""
    for event in events:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and event.get("args", {}).get("op_name") not in LAYOUT_OPS):
            yield event["name"].removesuffix("_kernel_time"), event["dur"] * 1e-6


def kernel_seconds(events: list[dict], runs: int) -> list[float]:
    """Per run, the summed kernel times of an onnxruntime profile (layout conversions left out)."""
    per_node: dict[str, list[float]] = defaultdict(list)
    for kernel, seconds in _kernels(events):
        per_node[kernel].append(seconds)
    if any(len(times) != runs for times in per_node.values()):
        raise OnnxPruneError(f"onnxruntime's profile does not hold {runs} runs of every node")
    return [sum(times[k] for times in per_node.values()) for k in range(runs)]


def kernel_node_shares(events: list[dict], walls: list[float], model: onnx.ModelProto) -> dict[str, float]:
    """Graph node name -> the median over runs of (its kernels' seconds in the run / the run's wall seconds), from
    an onnxruntime profile of ``len(walls)`` runs of ``model``. onnxruntime fuses nodes and renames what it
    rewrites: a kernel belongs to the node of its name, else to the node whose output tensor it is named after
    (the NCHWc kernels: ``<tensor>_nchwc``); kernels that match no node (layout conversions among them) are left
    out, and so are nodes fused into another node's kernel (their time is that kernel's)."""
    names = {node.name for node in model.graph.node}
    producer = {tensor: node.name for node in model.graph.node for tensor in node.output}
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(walls))
    seen: dict[str, int] = defaultdict(int)
    for kernel, seconds in _kernels(events):
        node = kernel if kernel in names else producer.get(kernel.removesuffix("_nchwc"))
        run = seen[kernel]
        seen[kernel] += 1
        if node is not None and run < len(walls):
            per_run[node][run] += seconds
    if any(count != len(walls) for count in seen.values()):
        raise OnnxPruneError(f"onnxruntime's profile does not hold {len(walls)} runs of every node")
    return {node: float(np.median([t / w for t, w in zip(times, walls)])) for node, times in per_run.items()}


class OverheadClock(OwnClock):
    """A run minus the run of an identity model on the same input, taken right after it."""

    def __init__(self, run, overhead_run):
        self.run, self.overhead_run = run, overhead_run
        self.times: list[float] = []

    def __call__(self) -> None:
        own, empty = _timed(self.run), _timed(self.overhead_run)
        self.times.append(max(own - empty, 0.05 * own))

    def seconds(self) -> list[float]:
        return list(self.times)


def _timed(run) -> float:
    start = time.perf_counter()
    measured = run()  # a runner timed on the device (CUDA events) returns its own seconds
    return measured if isinstance(measured, float) else time.perf_counter() - start


def overhead_model(feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model that does nothing but take the first input: its run time is the per-run overhead."""
    value = next(iter(feeds.values()))
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead",
                              [helper.make_tensor_value_info("x", elem, list(value.shape))],
                              [helper.make_tensor_value_info("y", elem, list(value.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def median_time(run, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    return statistics.median(_timed(run) for _ in range(repeats))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def get_backend(name: str, threads: int | None = None, cache_dir: str | None = None) -> Backend:
    if name not in BACKENDS:
        raise OnnxPruneError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    versions = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "onnxprune-trt-cache")
    if name == "ort-cpu":
        threads = threads or default_threads()
        return Backend(name, threads, f"{cpu_name()}, {threads} threads", versions)
    if name.startswith("torch"):
        return _torch_backend(name, threads, versions)
    if name == "tensorrt":
        trt, torch = _tensorrt_modules()
        versions.update(tensorrt=trt.__version__, torch=torch.__version__)
        return Backend(name, None, torch.cuda.get_device_name(0), versions, cache_dir)
    provider = {"ort-cuda": "CUDAExecutionProvider", "ort-tensorrt": "TensorrtExecutionProvider"}[name]
    if provider not in ort.get_available_providers():
        raise BackendUnavailable(f"backend {name} needs onnxruntime's {provider}, which this onnxruntime lacks "
                                 f"(available: {', '.join(ort.get_available_providers())}); pip install 'onnxprune[gpu]'")
    return Backend(name, None, _cuda_device_name(), versions, cache_dir)


def _cuda_device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "CUDA device"


def _ort_gpu_runner(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str, cache_dir: str | None):
    options = session_options()
    providers: list = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "tensorrt":
        os.makedirs(cache_dir, exist_ok=True)
        trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir,
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": cache_dir}
        providers = [("TensorrtExecutionProvider", trt_options)] + providers
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    wanted = "TensorrtExecutionProvider" if provider == "tensorrt" else "CUDAExecutionProvider"
    if session.get_providers()[0] != wanted:
        raise BackendUnavailable(f"onnxruntime gave {session.get_providers()[0]} instead of {wanted}: no usable GPU?")
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run() -> None:
        session.run_with_iobinding(binding)  # returns once the device work has finished
    return run


def _torch_backend(name: str, threads: int | None, versions: dict) -> Backend:
    """``torch`` resolves to ``torch-cuda`` when torch sees a GPU, else ``torch-cpu``; the name says which."""
    try:
        import torch
    except ImportError:
        raise MissingDependency(f"backend {name} needs torch: pip install 'onnxprune[torch]'") from None
    versions = {**versions, "torch": torch.__version__}
    if name == "torch":
        name = "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    if name == "torch-cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend torch-cuda needs a CUDA GPU; torch sees none")
        return Backend(name, None, torch.cuda.get_device_name(0), versions)
    threads = threads or default_threads()
    return Backend(name, threads, f"{cpu_name()}, {threads} threads", versions)


def _torch_runner(model: onnx.ModelProto, feeds: dict[str, np.ndarray], device: str, threads: int | None):
    """The model's torch copy in eval mode, no autograd, inputs already on ``device``; on CUDA the runner returns
    its own seconds from CUDA events."""
    import torch

    from onnxprune.train.bridge import GraphModule

    if threads:
        torch.set_num_threads(threads)
    module = GraphModule(model).eval().to(device)
    inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()}
    if device == "cpu":
        def run_cpu() -> None:
            with torch.inference_mode():
                module(inputs)
        return run_cpu

    def run_cuda() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode():
            start.record()
            module(inputs)
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return run_cuda


def _tensorrt_modules():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependency("backend tensorrt needs the tensorrt package (NVIDIA's index): "
                                 "pip install 'onnxprune[tensorrt]'") from None
    try:
        import torch
    except ImportError:
        raise MissingDependency("backend tensorrt uses torch's CUDA runtime for buffers and events: "
                                 "install a CUDA build of torch") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("backend tensorrt needs a CUDA GPU; torch sees none")
    return trt, torch


def _tensorrt_runner(model: onnx.ModelProto, feeds: dict[str, np.ndarray], cache_dir: str | None):
    """Build an engine for the feeds' shapes (shared timing cache on disk) and return a timed runner."""
    trt, torch = _tensorrt_modules()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OnnxPruneError(f"TensorRT could not parse the model: {errors}")
    config = builder.create_builder_config()
    cache_path = os.path.join(cache_dir, "timing.cache")
    os.makedirs(cache_dir, exist_ok=True)
    blob = open(cache_path, "rb").read() if os.path.exists(cache_path) else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, value in feeds.items():
        profile.set_shape(name, value.shape, value.shape, value.shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OnnxPruneError("TensorRT failed to build an engine for the model")
    with open(cache_path, "wb") as f:
        f.write(memoryview(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    buffers = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, feeds[name].shape)
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
        else:
            shape = tuple(context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=getattr(torch, str(np.dtype(trt.nptype(engine.get_tensor_dtype(name))))),
                                 device="cuda")
        buffers.append(tensor)
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()

    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    run.buffers = buffers  # keep the device buffers alive as long as the runner
    return run
