"""onnxruntime sessions whose execution provider is chosen and then verified.

onnxruntime-gpu installs on machines without a GPU and silently falls back to the CPU even when
only CUDA is asked for, so the provider a session really got is read back with
``get_providers()`` and reported by every verb.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass

import onnx
import onnxruntime as ort

from onnxprune.errors import OnnxPruneError, UnavailableBackend
from onnxprune.graph.io import over_protobuf_limit

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
SHORT_NAMES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


@dataclass
class Session:
    session: ort.InferenceSession
    provider: str  # what onnxruntime really uses: "cpu", "cuda" or "tensorrt"
    threads: int | None

    def run(self, feeds: dict, outputs: list[str] | None = None) -> list:
        """The outputs (all, or those named) on ``feeds``. A model onnxruntime cannot run (a damaged graph, an input
        it refuses): OnnxPruneError with onnxruntime's first line."""
        try:
            return self._run(feeds, outputs)
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise OnnxPruneError("onnxruntime could not run the model: "
                                 f"{str(exc).strip().splitlines()[0][:300]}") from exc

    def _run(self, feeds: dict, outputs: list[str] | None) -> list:
        if self.provider == "cpu":
            return self.session.run(outputs, feeds)
        # GPU: IO binding, so onnxruntime copies each input to the device once and each output back once.
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        names = outputs or self.output_names
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


def session_options(threads: int | None = None, spinning: bool = False, optimize: bool = True,
                    arena: bool = True, profile: str | None = None) -> ort.SessionOptions:
    """Options for a session; ``spinning=False`` keeps interleaved sessions from stealing each other's cores.

    ``arena=False`` returns activation memory after each run instead of keeping it for the next:
    for scoring, where dozens of sessions (one per candidate) live at once, each arena would keep
    its peak (benchmarks/RESULTS.md has the measured difference).
    ``profile``: turn onnxruntime's profiler on, writing to a file whose name starts with this prefix.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: an error onnxruntime logs is raised too, and reported in one line
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not arena:
        options.enable_cpu_mem_arena = False
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return options


def create_session(model: onnx.ModelProto | str | os.PathLike[str], provider: str = "auto",
                   threads: int | None = None, spinning: bool = False, optimize: bool = True,
                   arena: bool = True, profile: str | None = None) -> Session:
    """A session on ``provider`` ("auto": CUDA when a session really gets it, else CPU).

    Asking for "cuda" or "tensorrt" explicitly and not getting it is an error, never a silent fallback.
    A model over protobuf's 2 GB limit goes to onnxruntime through a temporary file with external data.
    """
    if provider not in ("auto", *PROVIDERS):
        raise OnnxPruneError(f"unknown provider {provider!r}; choose auto, cpu, cuda or tensorrt")
    if isinstance(model, onnx.ModelProto) and over_protobuf_limit(model):
        with tempfile.TemporaryDirectory(prefix="onnxprune-session-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            return create_session(path, provider, threads, spinning, optimize, arena, profile)  # the weights are read in here
    available = set(ort.get_available_providers())
    wanted = "cuda" if provider == "auto" and "CUDAExecutionProvider" in available else provider
    wanted = "cpu" if wanted == "auto" else wanted
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = session_options(threads, spinning, optimize, arena, profile)
    try:
        # the fallback is detected and reported below, not warned about (nor printed: onnxruntime prints its banner)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(source, options, providers=PROVIDERS[wanted])
    except Exception as exc:  # onnxruntime raises its own exception types
        if provider == "auto" and wanted != "cpu":
            return create_session(model, "cpu", threads, spinning, optimize, arena, profile)
        raise OnnxPruneError(f"onnxruntime could not create a session: {str(exc).strip().splitlines()[0][:300]}") from None
    used = SHORT_NAMES.get(session.get_providers()[0], session.get_providers()[0])
    if provider in ("cuda", "tensorrt") and used != provider:
        raise UnavailableBackend(f"asked for the {provider} provider but onnxruntime runs on {used} "
                             f"(available: {sorted(available)}); is onnxruntime-gpu installed and a GPU visible?")
    return Session(session, used, threads)
