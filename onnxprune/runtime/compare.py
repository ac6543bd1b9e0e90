"""CKA between tensors of the original network and the same tensors in modified copies of it,
over a calibration set: the measurement behind both SLP's block scores and LayerMerge's row
importances (docs/algorithms.md sections 1, 2 and 4).

A modified copy is usually a *suffix* (runtime.capture.suffix_model): the part after the change,
fed with tensors captured from the original network, so the unchanged prefix never runs twice.

Memory stays within a budget (``memory_budget`` bytes; None: ``default_memory_budget()``, 40% of
the memory available when scoring starts, at most 3 GiB). What scoring holds, and how each term is bounded:

- the copies: ``share_weights`` keeps only the initializers a copy does not share with the
  original, so dozens of copies cost kilobytes, not dozens of networks' weights;
- onnxruntime sessions: every session is created from a file in a temporary folder whose weights
  are external data (the original's written once, shared by every copy), which costs one copy of
  the weights per session instead of two (from serialized bytes);
- one batch of captured tensors and activations: the batch is lowered to fit a quarter of the budget;
- the copies' sessions and CKA accumulators: grouped so that each group fits what is left.

One group: one pass over the data runs the original (capturing every tensor the copies read or
are compared with) and every copy on each batch. Several groups: the original runs once, its
captured tensors are kept (in memory when they fit a quarter of the budget, else spilled to files
in the temporary folder) and each group takes one pass over them; without the disk space to
spill, the original runs again for each group. The temporary folder is always removed. Scores do
not depend on the budget beyond float rounding (the batch size may differ).

Measured figures: benchmarks/RESULTS.md, "Memory within a budget".

On a Ray cluster (inside ``onnxprune.scaleout.cluster.connect``, ``--ray``) every copy is a Ray task instead, fed from
the object store; the budget then only sets the batch (onnxprune/scaleout/scoring.py; docs/scale-out.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import progress
from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.io import weight_bytes
from onnxprune.options import connected_to_ray
from onnxprune.runtime.capture import (activation_bytes_per_sample, attention_mask_input, bytes_per_sample, feature_rows,
                                       row_width, tensor_width, with_outputs)
from onnxprune.runtime.session import create_session
from onnxprune.similarity.cka import accumulator

MEMORY_SHARE = 0.4  # of the available memory, when no budget is given
MAX_DEFAULT_BUDGET = 3 << 30  # ... but never more than this unless asked
MIN_BUDGET = 64 << 20  # the default budget never goes below this
SESSION_FACTOR = 1.25  # a session's bytes per byte of weights (measured: 1.0 from external data, 2.0 from bytes)
SESSION_OVERHEAD = 4 << 20  # bytes of a session besides its weights (measured: about 1 MB)
_EXTERNAL_MIN_BYTES = 1024  # initializers at least this large go to the weight files
_ALIGN = 4096

_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("onnxprune_memory_budget", default=None)


@dataclass
class Copy:
    """A modified network: fed ``feeds`` (its input name -> a tensor of the original, or a model
    input), its ``output`` compared with tensor ``reference`` of the original. ``shared`` names the
    initializers left out of ``model`` because the original has them, byte for byte (``share_weights``)."""

    model: onnx.ModelProto
    feeds: dict[str, str]
    output: str
    reference: str
    shared: tuple[str, ...] = ()


def share_weights(copy: Copy, original: onnx.ModelProto) -> Copy:
    """``copy`` without the initializers the original has under the same name with the same values:
    they are read from the original when the copy's session is created."""
    theirs = {t.name: t for t in original.graph.initializer}
    kept, shared = [], list(copy.shared)
    for t in copy.model.graph.initializer:
        if t.name in theirs and _same_tensor(t, theirs[t.name]):
            shared.append(t.name)
        else:
            kept.append(t)
    if len(kept) == len(copy.model.graph.initializer):
        return copy
    # Field by field: a copy that then deletes the initializers would keep their bytes (protobuf's upb
    # frees a message's memory only with the whole message).
    light = onnx.ModelProto()
    _copy_fields(copy.model, light, skip="graph")
    _copy_fields(copy.model.graph, light.graph, skip="initializer")
    light.graph.initializer.extend(kept)
    return replace(copy, model=light, shared=tuple(dict.fromkeys(shared)))


def _copy_fields(source, target, skip: str) -> None:
    for fd, value in source.ListFields():
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(target, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(target, fd.name).CopyFrom(value)
        else:
            setattr(target, fd.name, value)


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims) or a.data_location != b.data_location:
        return False
    if a.HasField("raw_data") and b.HasField("raw_data"):
        return a.raw_data == b.raw_data
    return a.SerializeToString() == b.SerializeToString()


# -- the budget ----------------------------------------------------------------------------------

def available_memory() -> int | None:
    """Bytes of memory this process could still take: MemAvailable from /proc/meminfo (else psutil,
    else the free pages os.sysconf reports), lowered to what a cgroup memory limit leaves. None if unknown."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            import psutil  # optional

            found = int(psutil.virtual_memory().available)
        except Exception:  # not installed, or no answer on this platform
            pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    left = _cgroup_left()
    if left is not None:
        found = left if found is None else min(found, left)
    return found


def _cgroup_left() -> int | None:
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return max(0, int(text) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def default_memory_budget() -> int:
    """``MEMORY_SHARE`` (40%) of ``available_memory()``, at most ``MAX_DEFAULT_BUDGET`` (3 GiB) and at
    least 64 MiB; 2 GiB when nothing says how much is free.

    Why 40%: the budget covers what scoring allocates (sessions, captured tensors, accumulators),
    not the data set, the models and Python around it, and onnxruntime's working memory in it is
    estimated, not measured; less than half leaves room for all of that and for other processes.
    Why a cap: past a few GiB a bigger budget buys one pass instead of two over the calibration
    data, not less work (the copies are the same), while a tool in a shared pipeline that takes
    10 GB because the machine happened to have it free is a bad neighbour. ``--memory-budget``
    lifts it."""
    available = available_memory()
    if available is None:
        return 2 << 30
    return max(MIN_BUDGET, min(MAX_DEFAULT_BUDGET, int(MEMORY_SHARE * available)))


@contextlib.contextmanager
def memory_budget(budget: int | None) -> Iterator[None]:
    """Within this block, scoring that is given no budget of its own uses ``budget`` (None: the default)."""
    token = _budget.set(budget)
    try:
        yield
    finally:
        _budget.reset(token)


def resolve_budget(budget: int | None = None) -> int:
    """``budget``, else the one set by ``memory_budget(...)``, else ``default_memory_budget()``."""
    if budget is None:
        budget = _budget.get()
    if budget is None:
        return default_memory_budget()
    if budget < 1:
        raise OnnxPruneError(f"the memory budget must be a positive number of bytes, not {budget}")
    return int(budget)


def groups_within(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most ``budget``
    (a single item over the budget gets a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= budget:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class ScoringPlan:
    """How ``cka_with_original`` spends its budget: the batch, the groups of copies that take one
    pass each, and where captured tensors are kept between passes ("none": one pass, or the
    original re-run per group; "memory"; "disk"). ``estimate``: the bytes the plan expects to hold."""

    budget: int
    batch: int
    groups: list[list[int]]
    store: str
    store_bytes: int
    estimate: int
    sizes: list[int] = field(default_factory=list)  # bytes per copy: its session and accumulator


def _accumulator_bytes(width_x: int, width_y: int, samples: int, unbiased: bool) -> tuple[int, int]:
    """(bytes held while accumulating, extra bytes while computing the value), as similarity.cka does."""
    if max(width_x, width_y) <= 512 and not unbiased:  # StreamingCKA: three p x p float64 sums (and as much per update)
        held = 8 * (width_x * width_x + width_y * width_y + width_x * width_y + width_x + width_y)
        return held, 2 * held
    held = 4 * samples * (width_x + width_y)  # StoredCKA: float32 rows; the value works on float64 copies
    return held, 7 * held + 8 * samples * samples * 4


def plan_scoring(original: onnx.ModelProto, copies: list[Copy], data: Dataset, batch: int = 64,
                 unbiased: bool = False, memory_budget: int | None = None,
                 spill_dir: str | None = None) -> ScoringPlan:
    """The batch, groups and store ``cka_with_original`` uses within ``memory_budget``."""
    budget = resolve_budget(memory_budget)
    inputs = set(data.inputs)
    n = len(data)
    rows = n if not data.static_batch else math.ceil(n / data.static_batch) * data.static_batch
    sizes_of = {t.name: t.ByteSize() for t in original.graph.initializer}
    full_weights = weight_bytes(original)
    captured = [name for c in copies for name in (c.reference, *c.feeds.values()) if name not in inputs]
    per_captured = bytes_per_sample(original, captured)
    per_input = sum(int(v[:1].nbytes) for v in data.inputs.values())
    mask = token_mask(original, data)
    tokens = tensor_width(original, mask) if mask else None
    activations = activation_bytes_per_sample(original)
    # One batch: its inputs, the captured tensors twice (onnxruntime's and numpy's), the original's activations
    # around them, and the activations of the copy that runs.
    per_sample = per_input + 2 * per_captured + 2 * activations
    size = data.static_batch or max(1, min(batch, (budget // 4) // max(per_sample, 1)))
    session_bytes, transient = [], 0
    for c in copies:
        weights = weight_bytes(c.model) + sum(sizes_of.get(name, 0) for name in c.shared)
        width_x = row_width(original, c.reference, tokens)
        width_y = row_width(c.model, c.output, tokens) or width_x
        held, working = _accumulator_bytes(width_x, width_y, n, unbiased)
        session_bytes.append(int(SESSION_FACTOR * weights) + SESSION_OVERHEAD + held)
        transient = max(transient, weights, working)  # creating one session reads its weights once more
    full = int(SESSION_FACTOR * full_weights) + SESSION_OVERHEAD
    one_batch = size * per_sample
    left = budget - full - one_batch - transient
    groups = groups_within(session_bytes, left)
    store, store_bytes = "none", 0
    if len(groups) > 1:
        store_bytes = rows * per_captured
        free = _disk_free(spill_dir)
        if store_bytes <= budget // 4:
            store = "memory"
            groups = groups_within(session_bytes, budget - store_bytes - one_batch - transient)
        elif free is not None and free >= store_bytes + (1 << 30):
            store = "disk"
            groups = groups_within(session_bytes, budget - one_batch - transient)
    held = max((sum(session_bytes[i] for i in g) for g in groups), default=0)
    if store == "none":
        estimate = full + one_batch + transient + held
    else:  # capturing (the original's session and the store filling up), then the groups over the store
        kept = store_bytes if store == "memory" else 0
        estimate = kept + one_batch + transient + max(full, held)
    return ScoringPlan(budget, size, groups, store, store_bytes, estimate, session_bytes)


def _disk_free(folder: str | None) -> int | None:
    try:
        return shutil.disk_usage(folder or tempfile.gettempdir()).free
    except OSError:
        return None


# -- scoring -------------------------------------------------------------------------------------

def cka_with_original(original: onnx.ModelProto, copies: list[Copy], data: Dataset, provider: str = "auto",
                      batch: int = 64, unbiased: bool = False, memory_budget: int | None = None,
                      spill_dir: str | None = None) -> tuple[list[float], str]:
    """(linear CKA of every copy's output with its reference tensor, the provider used).

    ``memory_budget``: bytes scoring may hold (None: the one set by ``memory_budget(...)``, else
    ``default_memory_budget()``); ``spill_dir``: where the temporary folder goes (default: the system's)."""
    if not copies:
        return [], create_session(original, provider).provider
    if connected_to_ray():  # --ray: one Ray task per copy (docs/scale-out.md)
        from onnxprune.scaleout.scoring import cka_on_ray

        return cka_on_ray(original, copies, data, provider, batch, unbiased, memory_budget, spill_dir)
    _release(full=True)  # what building the copies freed, before the budget is spent
    plan = plan_scoring(original, copies, data, batch, unbiased, memory_budget, spill_dir)
    mask = token_mask(original, data)
    values: list[float] = [0.0] * len(copies)
    with tempfile.TemporaryDirectory(prefix="onnxprune-scoring-", dir=spill_dir) as folder:
        files = _ModelFiles(Path(folder), original)
        if plan.store == "none":
            used = provider
            for group in plan.groups:
                members = [copies[k] for k in group]
                captured = _captured(members, data)
                full = create_session(files.write(with_outputs(original, captured), owned=True), provider, arena=False)
                used = full.provider

                def run_original(feeds: dict) -> dict:
                    return {**feeds, **dict(zip(full.output_names, full.run(feeds)))}

                _score_group(group, copies, data, plan.batch, files, provider, unbiased, run_original, values, mask)
                del full, run_original
                _release()
        else:
            store = _Store(Path(folder) / "captured" if plan.store == "disk" else None)
            captured = _captured(copies, data)
            full = create_session(files.write(with_outputs(original, captured), owned=True), provider, arena=False)
            used = full.provider
            for feeds, _, _ in progress.batches(data, plan.batch, "capturing activations"):
                store.append(dict(zip(full.output_names, full.run(feeds))), keep=set(captured))
            del full
            _release(full=True)
            for group in plan.groups:
                batches, names = iter(range(store.batches)), _captured([copies[k] for k in group], data)

                def from_store(feeds: dict) -> dict:
                    return {**feeds, **store.batch(next(batches), names)}

                _score_group(group, copies, data, plan.batch, files, provider, unbiased, from_store, values, mask)
                _release()
            store.close()
    return values, used


def token_mask(original: onnx.ModelProto, data: Dataset) -> str | None:
    """The data's attention mask, when the model has one: token sequences compared by CKA are pooled over the
    tokens it keeps (capture.feature_rows; docs/algorithms.md section 9)."""
    mask = attention_mask_input(original)
    return mask if mask in data.inputs else None


def _captured(members: list[Copy], data: Dataset) -> list[str]:
    inputs = set(data.inputs)
    return list(dict.fromkeys(name for c in members for name in (c.reference, *c.feeds.values()) if name not in inputs))


def _score_group(group: list[int], copies: list[Copy], data: Dataset, batch: int, files: _ModelFiles, provider: str,
                 unbiased: bool, tensors, values: list[float], mask: str | None = None) -> None:
    """One pass over the data for the copies in ``group``; ``tensors(feeds)``: the original's tensors of a batch;
    ``mask``: the input whose tokens the compared token sequences keep (``token_mask``)."""
    members = [copies[k] for k in group]
    # One session per copy, without onnxruntime's memory arena: each arena would keep its peak.
    sessions = [create_session(files.write(c.model, c.shared), provider, arena=False) for c in members]
    accumulators: list = [None] * len(members)
    for feeds, _, count in progress.batches(data, batch, f"scoring {len(members)} candidate(s)"):
        outs = tensors(feeds)
        kept = feeds[mask] if mask else None
        for k, (c, session) in enumerate(zip(members, sessions)):
            reference, got = copy_rows(c, session, outs, count, kept)
            if accumulators[k] is None:
                accumulators[k] = accumulator(reference.shape[1], unbiased)
            accumulators[k].update(reference, got)
        del outs
    del sessions
    if any(a is None for a in accumulators):
        raise OnnxPruneError("no calibration data to score with")
    for k, i in enumerate(group):
        values[i] = accumulators[k].value()
        accumulators[k] = None


def copy_rows(copy: Copy, session, outs: dict[str, np.ndarray], count: int,
              kept: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(the original's rows, the copy's rows) that CKA compares for one batch: ``outs`` holds the batch's inputs and
    the original's captured tensors, ``count`` its samples, ``kept`` the attention mask (feature_rows)."""
    reference = feature_rows(outs[copy.reference], count, kept)
    got = feature_rows(session.run({name: outs[source] for name, source in copy.feeds.items()}, [copy.output])[0],
                       count, kept)
    return reference, got


def _release(full: bool = False) -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise). Between groups
    only the young generations are collected: a group's sessions and arrays go by reference counting, and a full
    collection walks the whole heap (0.4 s in a process holding a few million objects, once per group)."""
    gc.collect() if full else gc.collect(1)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _ModelFiles:
    """Models written for onnxruntime with their weights as external data: the original's once, in
    ``original.bin`` (a copy's shared initializers point there), each model's own beside its file."""

    def __init__(self, folder: Path, original: onnx.ModelProto) -> None:
        self.folder = folder
        self.count = 0
        self.original = {t.name: t for t in original.graph.initializer}
        self.refs: dict[str, onnx.TensorProto] = {}  # name -> the same tensor, its data in original.bin
        with open(folder / "original.bin", "wb") as f:
            for t in original.graph.initializer:
                ref = _externalize(t, f, "original.bin", copy=True)
                if ref is not None:
                    self.refs[t.name] = ref

    def write(self, model: onnx.ModelProto, shared: tuple[str, ...] | list[str] = (), owned: bool = False) -> str:
        """Path of ``model`` (plus the original's initializers named in ``shared``), written out.
        ``owned``: ``model`` is a copy made for this: its initializers are taken over, not copied, and every one
        the original has under the same name must be the original's (true of ``with_outputs(original, ...)``)."""
        self.count += 1
        stem = f"model{self.count}"
        if owned:
            m = model
            shared = [t.name for t in m.graph.initializer if t.name in self.refs]
        else:
            m = onnx.ModelProto()
            m.CopyFrom(model)
        shared_set = set(shared)
        with open(self.folder / f"{stem}.bin", "wb") as f:
            for t in m.graph.initializer:
                if t.name in shared_set and t.name in self.refs:
                    t.CopyFrom(self.refs[t.name])
                else:
                    _externalize(t, f, f"{stem}.bin", copy=False)
        present = {t.name for t in m.graph.initializer}
        for name in shared:
            if name not in present:
                if name not in self.original:
                    raise OnnxPruneError(f"a copy shares initializer {name!r}, which the original does not have")
                m.graph.initializer.append(self.refs.get(name) or self.original[name])
        path = self.folder / f"{stem}.onnx"
        path.write_bytes(m.SerializeToString())
        return str(path)


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _externalize(t: onnx.TensorProto, f, location: str, copy: bool) -> onnx.TensorProto | None:
    """Append ``t``'s values to the open file ``f`` (named ``location``) and point a tensor at them: ``t``
    itself (``copy=False``) or a new tensor without values (``copy=True``). None, and ``t`` untouched,
    for small, string and already external tensors."""
    if (t.data_type == onnx.TensorProto.STRING or t.data_location == onnx.TensorProto.EXTERNAL
            or t.ByteSize() < _EXTERNAL_MIN_BYTES):
        return None
    data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
    offset = f.tell()
    pad = -offset % _ALIGN
    if pad:
        f.write(b"\0" * pad)
        offset += pad
    f.write(data)
    ref = t
    if copy:
        ref = onnx.TensorProto()
        ref.name, ref.data_type = t.name, t.data_type
        ref.dims.extend(t.dims)
    else:
        t.ClearField("raw_data")
        for name in _TYPED_FIELDS:
            t.ClearField(name)
        del t.external_data[:]
    ref.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
        entry = ref.external_data.add()
        entry.key, entry.value = key, value
    return ref


class _Store:
    """The original's captured tensors, batch by batch: in memory, or spilled to one file per tensor
    in ``folder`` (read back with plain reads, so they cost no resident memory between passes)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.batches = 0
        self.memory: dict[str, list[np.ndarray]] = {}
        self.layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # name -> (shape after the batch axis, dtype)
        self.rows: list[tuple[int, int]] = []  # per batch: (first row, rows)
        self.files: dict[str, Path] = {}
        if folder is not None:
            folder.mkdir()

    def append(self, tensors: dict[str, np.ndarray], keep: set[str]) -> None:
        first = self.rows[-1][0] + self.rows[-1][1] if self.rows else 0
        size = None
        for name, value in tensors.items():
            if name not in keep:
                continue
            value = np.ascontiguousarray(value)
            size = len(value)
            if self.folder is None:
                self.memory.setdefault(name, []).append(value)
                continue
            if name not in self.files:
                self.files[name] = self.folder / f"{len(self.files)}.bin"
                self.layout[name] = (value.shape[1:], value.dtype)
            elif (value.shape[1:], value.dtype) != self.layout[name]:
                raise OnnxPruneError(f"captured tensor {name} changed shape between batches: cannot spill it")
            with open(self.files[name], "ab") as f:
                value.tofile(f)
        self.rows.append((first, size or 0))
        self.batches += 1

    def batch(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        if self.folder is None:
            return {name: self.memory[name][index] for name in names}
        first, count = self.rows[index]
        out = {}
        for name in names:
            shape, dtype = self.layout[name]
            per_row = int(np.prod(shape, dtype=np.int64))
            values = np.fromfile(self.files[name], dtype=dtype, count=count * per_row,
                                 offset=first * per_row * dtype.itemsize)
            out[name] = values.reshape((count, *shape))
        return out

    def close(self) -> None:
        self.memory.clear()
