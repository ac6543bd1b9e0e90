"""Calibration and evaluation data for every verb (``--data``).

Accepted: ``.npy`` / ``.npz`` arrays, a folder of images (labels from sub-folder names), a tar of
images, or ``random`` (clearly labelled as such wherever it is used). A float array shaped like the
model's input is fed as it is; a uint8 image array (NHWC or NCHW) goes through the model's
``onnxprune.preprocess`` metadata or the flags that override it. In an ``.npz`` the images are
under ``x`` or the model's input name, the labels (optional) under ``y``; a model with several
inputs (a BERT's ``input_ids`` and ``attention_mask``) takes one array per input name, integers of
another width and booleans cast to the input's type when every value fits (docs/algorithms.md section 9).
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import onnx

from onnxprune.data.preprocess import Preprocess, class_names, preprocess_of
from onnxprune.errors import MissingDependency, OnnxPruneError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff"}
RANDOM = "random"
_PREPROCESS_CHUNK = 256  # images turned into float inputs at a time
_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                  onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
                  onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
                  onnx.TensorProto.BOOL: np.bool_}


@dataclass(frozen=True)
class ModelInput:
    name: str
    shape: tuple[int | None, ...]  # None: symbolic (a dynamic batch)
    dtype: np.dtype


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model with a fixed batch dimension takes (None when the batch is symbolic)."""
    sizes = {i.shape[0] for i in model_inputs(model) if i.shape and i.shape[0] is not None and i.shape[0] > 0}
    if len(sizes) > 1:
        raise OnnxPruneError(f"the model's inputs have different fixed batch sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


class Batch(NamedTuple):
    """Model inputs for one run; the first ``count`` rows are samples of the data set, any rows after
    them repeat earlier samples to fill a static batch, and ``labels`` cover the ``count`` rows."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    count: int


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]  # every array has the samples on axis 0
    labels: np.ndarray | None
    source: str  # what a report says the data was
    random: bool = False
    static_batch: int | None = None  # the model takes batches of exactly this size (a fixed batch dimension)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, rows: np.ndarray) -> Dataset:
        """The samples at ``rows`` (indices), as a data set of their own."""
        return Dataset({k: v[rows] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[rows],
                       self.source, self.random, self.static_batch)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Batches of ``batch_size`` samples, or of exactly ``static_batch`` rows for a model with a
        fixed batch dimension (the last one filled up with samples from the start of the data set)."""
        size = self.static_batch or batch_size
        for start in range(0, len(self), size):
            rows = np.arange(start, start + size) % len(self) if self.static_batch else slice(start, start + size)
            feeds = {k: v[rows] for k, v in self.inputs.items()}
            count = min(size, len(self) - start)
            yield Batch(feeds, None if self.labels is None else self.labels[start:start + count], count)


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    initializers = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        t = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        out.append(ModelInput(vi.name, shape, np.dtype(_ONNX_TO_NUMPY.get(t.elem_type, np.float32))))
    return out


def load_data(spec: str | os.PathLike[str] | None, model: onnx.ModelProto, samples: int | None = None,
              seed: int = 0, preprocess: Preprocess | None = None, labels: str | os.PathLike[str] | None = None,
              default_random_samples: int = 64) -> Dataset:
    """The data set named by ``spec`` as model inputs; ``samples`` keeps a seeded random subset."""
    if samples is not None and samples < 1:
        raise OnnxPruneError(f"--samples must be at least 1, not {samples}")
    dataset = _load(spec, model, samples, seed, preprocess, labels, default_random_samples)
    dataset.static_batch = static_batch(model)
    _refuse_huge_static_batch(dataset)
    return dataset


STATIC_BATCH_SHARE = 8  # one static batch of inputs may take at most this fraction of the memory budget


def _refuse_huge_static_batch(dataset: Dataset) -> None:
    """Refuse a fixed batch dimension whose one batch of inputs alone takes more than 1/STATIC_BATCH_SHARE of the
    memory budget (onnxprune.runtime.compare): every run feeds whole batches, and the activations of a batch are many
    times its inputs (a damaged file, or a model exported at a batch far too large for this machine)."""
    if not dataset.static_batch:
        return
    from onnxprune.runtime.compare import resolve_budget

    per_sample = sum(v[:1].nbytes for v in dataset.inputs.values())
    budget = resolve_budget()
    if dataset.static_batch * per_sample > budget / STATIC_BATCH_SHARE:
        raise OnnxPruneError(f"the model takes batches of exactly {dataset.static_batch} samples (a fixed batch "
                             f"dimension): one batch of inputs is {dataset.static_batch * per_sample / 2**30:.2f} GiB, "
                             f"more than 1/{STATIC_BATCH_SHARE} of the memory budget ({budget / 2**30:.2f} GiB); export "
                             "it with a smaller or a dynamic batch")


def _load(spec, model, samples, seed, preprocess, labels, default_random_samples) -> Dataset:
    inputs = model_inputs(model)
    if spec is None or str(spec) == RANDOM:
        return _random(inputs, samples or default_random_samples, seed)
    path = Path(spec)
    if not path.exists():
        raise OnnxPruneError(f"no such data: {path} (give a .npy/.npz file, an image folder, a tar of images, or 'random')")
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        raise OnnxPruneError(text_refusal(path, inputs))
    prep = _preprocess(model, preprocess)
    names = class_names(model)
    pick = _Subset(samples, seed)
    if path.is_dir():
        files = _folder_images(path)
        if not files and any(p.suffix.lower() in TEXT_SUFFIXES for p in path.rglob("*")):
            raise OnnxPruneError(text_refusal(path, inputs))
        images, y = _decode(files, prep, names, pick)
        dataset = _from_array(images, y, inputs, prep, f"image folder {path}", pick)
    elif path.suffix == ".npy":
        dataset = _from_array(pick(_load_npy(path)), None, inputs, prep, f"array {path}", pick)
    elif path.suffix == ".npz":
        dataset = _from_npz(path, inputs, prep, pick)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            images, y = _decode(_tar_images(tar), prep, names, pick)
        dataset = _from_array(images, y, inputs, prep, f"image tar {path}", pick)
    else:
        raise OnnxPruneError(f"{path}: not a .npy/.npz file, an image folder or a tar of images")
    if labels is not None:
        all_labels = _load_npy(Path(labels))
        _check_labels(all_labels, pick.total if pick.total is not None else len(dataset), str(labels))
        dataset.labels = _check_labels(pick(all_labels), len(dataset), str(labels))
    return dataset


class _Subset:
    """A seeded random subset of ``samples`` items, chosen once from the first sequence it is given
    and applied alike to every later one (images, then their labels), before anything is decoded
    or preprocessed: ``--samples 256`` of a large set costs 256 images of memory and time."""

    def __init__(self, samples: int | None, seed: int) -> None:
        self.samples, self.seed = samples, seed
        self.total: int | None = None
        self.kept: np.ndarray | None = None

    def describe(self, n: int) -> str:
        return f"({n} samples)" if self.kept is None else f"({n} of {self.total} samples, seed {self.seed})"

    def __call__(self, items):
        if isinstance(items, np.ndarray) and items.ndim == 0:
            return items  # not a set of samples: refused by whoever reads it
        if self.total is None:
            self.total = len(items)
            if self.samples is not None and self.samples < self.total:
                rng = np.random.default_rng(self.seed)
                self.kept = np.sort(rng.choice(self.total, self.samples, replace=False))
        elif len(items) != self.total:
            raise OnnxPruneError(f"expected {self.total} items to take the same samples from, got {len(items)}")
        if self.kept is None:
            return items
        return items[self.kept] if isinstance(items, np.ndarray) else [items[i] for i in self.kept]


def _random(inputs: list[ModelInput], n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    arrays = {}
    for inp in inputs:
        if any(d is None for d in inp.shape[1:]):
            readable = ["?" if d is None else d for d in inp.shape]
            raise OnnxPruneError(f"random inputs for {inp.name} {readable}: its sizes other than the batch are "
                                 "symbolic; give --input-shape (e.g. 3,224,224) or real --data")
        shape = (n,) + tuple(inp.shape[1:])
        if np.issubdtype(inp.dtype, np.floating):
            arrays[inp.name] = rng.standard_normal(shape).astype(inp.dtype)
        else:
            arrays[inp.name] = rng.integers(0, 10, shape).astype(inp.dtype)
    return Dataset(arrays, None, f"RANDOM inputs (N(0,1), {n} samples, seed {seed}): not real data", random=True)


def _preprocess(model: onnx.ModelProto, override: Preprocess | None) -> Preprocess | None:
    return override if override is not None else preprocess_of(model)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # a subset reads only its rows
    except (OSError, ValueError) as exc:
        raise OnnxPruneError(f"cannot read {path} as a .npy array: {exc}") from None


# What numpy and zipfile raise for a damaged .npz (a truncated or corrupted zip, a member that does not inflate)
_DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _member(archive, key: str, path: Path) -> np.ndarray:
    """The array ``key`` of an open .npz (read when asked for: a damaged member shows only then)."""
    try:
        return archive[key]
    except _DAMAGED as exc:
        raise OnnxPruneError(f"cannot read {key!r} from {path}: the archive is damaged ({exc})") from None


def _from_npz(path: Path, inputs: list[ModelInput], prep: Preprocess | None, pick: _Subset) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except _DAMAGED as exc:
        raise OnnxPruneError(f"cannot read {path} as a .npz archive: {exc}") from None
    with archive:
        keys = set(archive.files)
        y = _member(archive, "y", path) if "y" in keys else None
        if len(inputs) > 1:
            missing = [i.name for i in inputs if i.name not in keys]
            if missing:
                raise OnnxPruneError(f"{path} has no arrays for the model inputs {missing} (it has {sorted(keys)})")
            raw = {i.name: _member(archive, i.name, path) for i in inputs}
            total = _same_length(raw, str(path))
            if y is not None:
                _check_labels(y, total, str(path))
            arrays = {i.name: _as_input(pick(raw[i.name]), i, prep, str(path)) for i in inputs}
            n = _same_length(arrays, str(path))
            return Dataset(arrays, _check_labels(pick(y), n, str(path)) if y is not None else None,
                           f"arrays {path} {pick.describe(n)}")
        name = inputs[0].name
        key = name if name in keys else "x" if "x" in keys else None
        if key is None:
            raise OnnxPruneError(f"{path} has no array 'x' or '{name}' (the model's input); it has {sorted(keys)}")
        x = _member(archive, key, path)
        if x.ndim == 0:
            raise OnnxPruneError(f"{path}[{key}] is a single value, not an array of samples")
        if y is not None:
            _check_labels(y, len(x), str(path))
        return _from_array(pick(x), None if y is None else pick(y), inputs, prep, f"arrays {path}[{key}]", pick)


def _from_array(array: np.ndarray, y: np.ndarray | None, inputs: list[ModelInput], prep: Preprocess | None,
                source: str, pick: _Subset) -> Dataset:
    if len(inputs) != 1:
        raise OnnxPruneError(f"the model has {len(inputs)} inputs; give an .npz with one array per input name")
    x = _as_input(array, inputs[0], prep, source)
    return Dataset({inputs[0].name: x}, _check_labels(y, len(x), source) if y is not None else None,
                   f"{source} {pick.describe(len(x))}")


def _as_input(array: np.ndarray, inp: ModelInput, prep: Preprocess | None, source: str) -> np.ndarray:
    if array.size == 0 or array.ndim == 0 or len(array) == 0:
        raise OnnxPruneError(f"{source} is empty")
    if array.dtype == np.uint8 and np.issubdtype(inp.dtype, np.floating):
        return _images_to_input(array, inp, prep, source)
    if np.issubdtype(inp.dtype, np.floating) and not np.issubdtype(array.dtype, np.floating):
        raise OnnxPruneError(f"{source} has dtype {array.dtype}; the model input {inp.name} takes floats "
                             "(give floats shaped like the input, or uint8 images)")
    if not np.issubdtype(inp.dtype, np.floating) and array.dtype != inp.dtype:
        _check_integers(array, inp, source)
    _check_shape(array.shape, inp, source)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise OnnxPruneError(f"{source} contains NaN or Inf values")
    return np.array(array, dtype=inp.dtype, order="C")  # a copy: never a view of a memory-mapped file


def _check_integers(array: np.ndarray, inp: ModelInput, source: str) -> None:
    """Integers (or booleans) for an integer or boolean input, of another width (token ids saved as int32 for
    an int64 input, a boolean attention mask), are taken when every value fits the input's dtype."""
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise OnnxPruneError(f"{source} has dtype {array.dtype}; the model input {inp.name} takes {inp.dtype}")
    low, high = (0, 1) if inp.dtype == np.bool_ else (np.iinfo(inp.dtype).min, np.iinfo(inp.dtype).max)
    if array.size and (array.min() < low or array.max() > high):
        raise OnnxPruneError(f"{source} has values from {array.min()} to {array.max()}; the model input {inp.name} "
                             f"takes {inp.dtype}")


def _check_shape(shape: tuple, inp: ModelInput, source: str) -> None:
    expected = inp.shape
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected[1:], shape[1:])):
        readable = ["?" if d is None else d for d in expected]
        raise OnnxPruneError(f"{source} has shape {list(shape)}; the model input {inp.name} is {readable}")


def _images_to_input(images: np.ndarray, inp: ModelInput, prep: Preprocess | None, source: str) -> np.ndarray:
    if prep is None:
        raise OnnxPruneError(f"{source} holds uint8 images but the model has no onnxprune.preprocess metadata: "
                             "give --mean, --std and --scale (and --layout) to turn them into inputs")
    if images.ndim != 4:
        raise OnnxPruneError(f"{source}: uint8 images must be (N, H, W, C) or (N, C, H, W), not {list(images.shape)}")
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    channels = len(prep.mean)
    x = None
    for start in range(0, len(images), _PREPROCESS_CHUNK):  # chunks: the float32 copy is the only big array
        part = prep.apply(images[start:start + _PREPROCESS_CHUNK, ..., :channels])
        if x is None:
            _check_shape(part.shape, inp, source)
            x = np.empty((len(images), *part.shape[1:]), inp.dtype)
        x[start:start + len(part)] = part
    return x


def _same_length(arrays: dict[str, np.ndarray], source: str) -> int:
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise OnnxPruneError(f"{source}: the input arrays have different sample counts {sorted(lengths)}")
    return lengths.pop()


def _check_labels(y: np.ndarray | None, n: int, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise OnnxPruneError(f"{source}: labels must be {n} integers, got shape {list(y.shape)} of {y.dtype}")
    return y.astype(np.int64)


ImageFile = tuple[str, Callable[[], bytes], str | None]  # (name, read its bytes, its folder or None)


TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")  # text: refused with what to give (a folder: if it has no images)


def text_refusal(path: Path, inputs: list[ModelInput]) -> str:
    """What to give instead of text: onnxprune tokenizes nothing (an exported graph carries no tokenizer, and which
    one a model was trained with is not in the file), so the token arrays, one per graph input, in an .npz."""
    described = ", ".join(f"{i.name} ({i.dtype.name}, shape {['N' if d is None else d for d in i.shape]})"
                          for i in inputs)
    names = ", ".join(f"{i.name}=..." for i in inputs)
    return (f"{path}: text, which onnxprune cannot feed to this model: the ONNX file carries no tokenizer. Tokenize "
            f"the lines with the tokenizer the model was trained with and give an .npz with one array per input: "
            f"{described}; for example np.savez('calib.npz', {names}) from a Hugging Face tokenizer's "
            f"tok(lines, padding='max_length', truncation=True, max_length=L, return_tensors='np')")


def _folder_images(root: Path) -> list[ImageFile]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(str(p), p.read_bytes, p.parent.name if p.parent != root else None) for p in files]


def _tar_images(tar: tarfile.TarFile) -> list[ImageFile]:
    out = []
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        parts = member.name.split("/")
        if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
            out.append((member.name, lambda m=member: tar.extractfile(m).read(), parts[-2] if len(parts) > 1 else None))
    return out


def _decode(files: list[ImageFile], prep: Preprocess | None, names: list[str] | None,
            pick: _Subset) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes (and resizes) only the picked files; class indices come from all of them."""
    if not files:
        raise OnnxPruneError("no image files found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependency("decoding images needs Pillow: pip install pillow") from None
    size = prep.size if prep is not None else None
    all_folders = [folder for _, _, folder in files]
    files = pick(files)
    images = []
    for name, read, _ in files:
        try:
            image = Image.open(io.BytesIO(read())).convert("RGB")
        except OSError as exc:
            raise OnnxPruneError(f"cannot decode image {name}: {exc}") from None
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        images.append(np.asarray(image, dtype=np.uint8))
    if len({im.shape for im in images}) > 1:
        raise OnnxPruneError("the images have different sizes and the model's preprocessing names no size to resize to")
    folders = [folder for _, _, folder in files]
    if any(f is None for f in all_folders):
        return np.stack(images), None
    classes = names if names is not None else sorted(set(all_folders))
    unknown = sorted(set(all_folders) - set(classes))
    if unknown:
        raise OnnxPruneError(f"image folders {unknown} are not among the model's class names {classes}")
    return np.stack(images), np.asarray([classes.index(f) for f in folders], dtype=np.int64)
