"""Fair timing on a shared machine: models take turns, and what is compared is read within a round.

On the 2-core development machines (virtual machines on a shared host), the same model runs much
slower for seconds at a time; two medians taken one model after the other read a model
against itself as clearly faster or slower (benchmarks/RESULTS.md). So models take turns in short
rounds (A B, then B A, cancelling a steady drift) and a speed-up is the median over rounds of the
ratio measured within each round; a LayerMerge row is timed as a fraction of the whole model timed
in the same round. Spinning is off in every session
(runtime/session.py), so an idle session does not steal the other's cores.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.data.sources import model_inputs
from onnxprune.errors import OnnxPruneError
from onnxprune.latency.backends import Backend, OwnClock, median_time
from onnxprune.progress import progress


def random_feeds(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for timing: standard normal floats (integers in 0..9), symbolic dims other than the batch as 1.

    A model with a fixed batch dimension is timed at that batch alone: any other ``batch`` is an error."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model_inputs(model):
        if inp.shape and inp.shape[0] is not None and inp.shape[0] != batch:
            raise OnnxPruneError(f"the model takes batches of exactly {inp.shape[0]} (input {inp.name} has a fixed "
                                 f"batch dimension): it cannot be timed at batch {batch}")
        shape = [batch] + [d if d is not None else 1 for d in inp.shape[1:]]
        if np.issubdtype(inp.dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(inp.dtype)
        else:
            feeds[inp.name] = rng.integers(0, 10, shape).astype(inp.dtype)
    return feeds


@dataclass
class SideBySide:
    medians: list[float]  # median seconds of one run of each model
    speedups: list[float]  # per model: median over rounds of (the first model's time / this model's), 1 for the first
    rounds: int
    runs_per_turn: int
    times: list[list[float]] = field(default_factory=list)  # per model: the seconds of one run, in every round


def compare(models: Sequence[onnx.ModelProto], backend: Backend, batch: int, rounds: int = 25,
            turn_s: float = 0.02, warmup: int = 3) -> SideBySide:
    """Median latency of each model and its speed-up over the first, measured side by side.

    Each round every model takes one turn of ``runs_per_turn`` runs (enough for about ``turn_s``
    seconds, at least one); the order alternates between rounds."""
    runners = [backend.runner(model, random_feeds(model, batch)) for model in models]
    single = [median_time(run, warmup, 3) for run in runners]
    repeats = max(1, min(20, round(turn_s / max(max(single), 1e-6))))
    times: list[list[float]] = [[] for _ in models]
    for r in progress(range(rounds), desc=f"timing {len(runners)} model(s) side by side"):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for k in order:
            times[k].append(median_time(runners[k], 0, repeats))
    speedups = [statistics.median(a / b for a, b in zip(times[0], t)) for t in times]
    return SideBySide([statistics.median(t) for t in times], speedups, rounds, repeats, times)


def time_in_rounds(whole: Callable[[], object], reference: Callable[[], object], clocks: Sequence[OwnClock],
                   rounds: int = 20, warmup: int = 3) -> tuple[float, list[float]]:
    """(median seconds of ``whole``, each clock's own seconds), every clock timed once per round beside
    ``whole`` and ``reference`` (the whole model under the clocks' conditions, Backend.reference_runner):
    a clock's seconds are the median over rounds of its share of the round's reference run, times
    the whole's median, so a slow spell of the machine, or a profiler's cost, scales both alike."""
    for run in [whole, reference, *clocks]:
        for _ in range(warmup):
            run()
    whole_times, reference_times = [], []
    for _ in progress(range(rounds), desc=f"latency: timing {len(clocks)} row(s)"):
        whole_times.append(median_time(whole, 0, 1))
        reference_times.append(median_time(reference, 0, 1))
        for clock in clocks:
            clock()
    whole_s = statistics.median(whole_times)
    own = []
    for clock in clocks:
        seconds = clock.seconds()[warmup:]
        own.append(whole_s * statistics.median(t / w for t, w in zip(seconds, reference_times)))
    return whole_s, own
