import json
import tarfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from PIL import Image

from onnxprune import api
from onnxprune.data.preprocess import Preprocess
from onnxprune.data.sources import load_data
from onnxprune.errors import OnnxPruneError
from onnxprune.options import DataOptions

CLASSES = ["red", "green", "blue"]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def colour_model(with_metadata: bool = True) -> onnx.ModelProto:
    """logits = per-channel mean of the input: a red image is class 0, green 1, blue 2."""
    eye = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "eye")
    nodes = [helper.make_node("Conv", ["input", "eye"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["logits"], name="flatten")]
    graph = helper.make_graph(nodes, "colour", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", 1, ["N", 3])], [eye])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if with_metadata:
        prep = {"input": "input", "layout": "NCHW", "size": [8, 8], "scale": 1 / 255, "mean": MEAN, "std": STD}
        model.metadata_props.add(key="onnxprune.preprocess", value=json.dumps(prep))
        model.metadata_props.add(key="onnxprune.labels", value=json.dumps(CLASSES))
    return model


def colour_images(n_per_class: int = 4, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for c in range(3):
        for _ in range(n_per_class):
            im = np.full((size, size, 3), 30, np.uint8)
            im[..., c] = 220
            images.append(im)
            labels.append(c)
    return np.stack(images), np.asarray(labels)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "colour.onnx"
    onnx.save(colour_model(), path)
    return path


def test_uint8_images_nhwc_and_nchw_follow_the_metadata(tmp_path):
    x, y = colour_images()
    np.save(tmp_path / "nhwc.npy", x)
    np.save(tmp_path / "nchw.npy", x.transpose(0, 3, 1, 2))
    a = load_data(tmp_path / "nhwc.npy", colour_model())
    b = load_data(tmp_path / "nchw.npy", colour_model())
    np.testing.assert_array_equal(a.inputs["input"], b.inputs["input"])
    expected = ((x[0].astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(a.inputs["input"][0], expected, rtol=1e-6)
    assert a.labels is None and not a.random


def test_float_array_is_fed_as_it_is(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8))
    np.save(tmp_path / "x.npy", x)
    d = load_data(tmp_path / "x.npy", colour_model())
    assert d.inputs["input"].dtype == np.float32 and np.allclose(d.inputs["input"], x, atol=1e-6)


def test_npz_with_x_y_or_the_input_name(tmp_path):
    x, y = colour_images()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", input=x)
    assert (load_data(tmp_path / "a.npz", colour_model()).labels == y).all()
    assert load_data(tmp_path / "b.npz", colour_model()).labels is None


def write_images(root, nested: bool = True):
    x, y = colour_images(2, size=16)  # resized to the model's 8x8 on the way in
    for k, (im, label) in enumerate(zip(x, y)):
        folder = root / CLASSES[label] if nested else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{k}.png")
    return y


def test_image_folder_with_class_subfolders_and_a_flat_one(tmp_path):
    y = write_images(tmp_path / "nested")
    d = load_data(tmp_path / "nested", colour_model())
    assert sorted(d.labels.tolist()) == sorted(y.tolist()) and d.inputs["input"].shape == (6, 3, 8, 8)
    write_images(tmp_path / "flat", nested=False)
    assert load_data(tmp_path / "flat", colour_model()).labels is None


def test_tar_of_images(tmp_path):
    write_images(tmp_path / "imgs")
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    d = load_data(tmp_path / "imgs.tar.gz", colour_model())
    assert len(d) == 6 and sorted(set(d.labels.tolist())) == [0, 1, 2]


def test_random_fallback_is_labelled_and_seeded():
    a, b = load_data(None, colour_model(), samples=8, seed=3), load_data("random", colour_model(), samples=8, seed=3)
    assert a.random and "RANDOM" in a.source and len(a) == 8
    np.testing.assert_array_equal(a.inputs["input"], b.inputs["input"])


def test_samples_keep_a_seeded_subset(tmp_path):
    x, y = colour_images(10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    a = load_data(tmp_path / "d.npz", colour_model(), samples=7, seed=1)
    b = load_data(tmp_path / "d.npz", colour_model(), samples=7, seed=1)
    assert len(a) == 7 and (a.labels == b.labels).all() and "7 of 30" in a.source
    assert [len(f["input"]) for f, _, _ in a.batches(3)] == [3, 3, 1]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    c = load_data(tmp_path / "x.npy", colour_model(), samples=7, seed=1, labels=tmp_path / "y.npy")
    np.testing.assert_array_equal(c.inputs["input"], a.inputs["input"])  # the same subset from every source
    np.testing.assert_array_equal(c.labels, a.labels)
    np.save(tmp_path / "short.npy", y[:-1])
    with pytest.raises(OnnxPruneError, match="labels must be 30 integers"):
        load_data(tmp_path / "x.npy", colour_model(), samples=7, labels=tmp_path / "short.npy")


@pytest.mark.parametrize("as_tar", [False, True])
def test_samples_decode_only_the_images_they_keep(tmp_path, monkeypatch, as_tar):
    """--samples 256 of a big image set must not decode (and resize) all of it."""
    from PIL import Image as PILImage

    write_images(tmp_path / "imgs")
    source = tmp_path / "imgs"
    if as_tar:
        with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
            tar.add(source, arcname="imgs")
        source = tmp_path / "imgs.tar"
    opened = []
    real_open = PILImage.open
    monkeypatch.setattr(PILImage, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    d = load_data(source, colour_model(), samples=2, seed=5)
    assert len(d) == 2 and len(opened) == 2 and "2 of 6" in d.source
    # labels index the model's class names, and each picked image is of its label's colour
    colour = d.inputs["input"].mean(axis=(2, 3)).argmax(axis=1)
    np.testing.assert_array_equal(colour, d.labels)


@pytest.mark.parametrize("make, message", [
    (lambda d: np.save(d / "f.npy", np.zeros((2, 3, 9, 8), np.float32)), "has shape"),
    (lambda d: np.save(d / "f.npy", np.zeros((2, 3, 8, 8), np.int32)), "dtype int32"),
    (lambda d: np.save(d / "f.npy", np.full((2, 3, 8, 8), np.nan, np.float32)), "NaN or Inf"),
    (lambda d: np.save(d / "f.npy", np.zeros((0, 3, 8, 8), np.float32)), "empty"),
    (lambda d: np.save(d / "f.npy", np.zeros((2, 8, 8), np.uint8)), "must be"),
    (lambda d: np.save(d / "f.npy", np.float32(3)), "empty"),
])
@pytest.mark.parametrize("samples", [None, 1])
def test_bad_arrays_are_refused(tmp_path, make, message, samples):
    make(tmp_path)
    with pytest.raises(OnnxPruneError, match=message):
        load_data(tmp_path / "f.npy", colour_model(), samples=samples)


def test_other_refusals(tmp_path):
    x, y = colour_images()
    np.savez(tmp_path / "wrong_names.npz", images=x)
    with pytest.raises(OnnxPruneError, match="no array 'x' or 'input'"):
        load_data(tmp_path / "wrong_names.npz", colour_model())
    np.savez(tmp_path / "bad_y.npz", x=x, y=y[:-1])
    for samples in (None, 3):
        with pytest.raises(OnnxPruneError, match="labels must be"):
            load_data(tmp_path / "bad_y.npz", colour_model(), samples=samples)
    np.save(tmp_path / "u8.npy", x)
    with pytest.raises(OnnxPruneError, match="no onnxprune.preprocess metadata"):
        load_data(tmp_path / "u8.npy", colour_model(with_metadata=False))
    assert len(load_data(tmp_path / "u8.npy", colour_model(False), preprocess=Preprocess(mean=MEAN, std=STD))) == 12
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxPruneError, match="no image files"):
        load_data(tmp_path / "empty", colour_model())
    write_images(tmp_path / "other")
    (tmp_path / "other" / "red").rename(tmp_path / "other" / "crimson")
    with pytest.raises(OnnxPruneError, match="not among the model's class names"):
        load_data(tmp_path / "other", colour_model())
    with pytest.raises(OnnxPruneError, match="no such data"):
        load_data(tmp_path / "missing.npz", colour_model())
    with pytest.raises(OnnxPruneError, match="at least 1"):
        load_data(None, colour_model(), samples=0)


def test_eval_accuracy_and_agreement(tmp_path, model_file):
    x, y = colour_images()
    y_wrong = y.copy()
    y_wrong[:3] = (y_wrong[:3] + 1) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y_wrong)
    result = api.evaluate(model_file, DataOptions(str(tmp_path / "d.npz")), reference=str(model_file))
    assert result.accuracy == pytest.approx(9 / 12) and result.agreement == 1.0 and result.mean_kl < 1e-12
    assert result.provider == "cpu" and not result.to_dict()["random_data"]
    with pytest.raises(OnnxPruneError, match="nothing to evaluate"):
        api.evaluate(model_file, DataOptions(None))


def static_colour_model(batch: int) -> onnx.ModelProto:
    model = colour_model()
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    return model


@pytest.mark.parametrize("batch", [1, 4])
def test_a_static_batch_model_gets_batches_of_exactly_its_size(batch):
    x, y = colour_images(3)  # 9 images: not a multiple of 4
    d = load_data(None, static_colour_model(batch), samples=9)
    assert d.static_batch == batch
    got = list(d.batches(64))
    assert all(len(b.feeds["input"]) == batch for b in got)
    assert sum(b.count for b in got) == 9
    last = got[-1]
    np.testing.assert_array_equal(last.feeds["input"][last.count:], d.inputs["input"][:batch - last.count])


def test_a_static_batch_too_large_for_the_memory_budget_is_refused():
    """A fixed batch whose one batch of inputs takes over 1/8 of the budget (the 10,000-case fuzz run set one to
    1,048,576 and healing then tried to allocate 22 GB)."""
    from onnxprune.runtime.compare import memory_budget

    per_sample = 3 * 8 * 8 * 4  # static_colour_model's input: 3 x 8 x 8 float32
    with memory_budget(8 * 1024 * per_sample):
        load_data(None, static_colour_model(1024), samples=4)  # exactly 1/8: accepted
        with pytest.raises(OnnxPruneError, match="fixed batch dimension"):
            load_data(None, static_colour_model(1025), samples=4)


def test_a_static_batch_model_evaluates_every_sample_once(tmp_path):
    """Accuracy over 9 samples at a fixed batch of 4: the filler rows of the last batch are not counted."""
    x, y = colour_images(3)
    path = tmp_path / "static.onnx"
    onnx.save(static_colour_model(4), path)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    result = api.evaluate(path, DataOptions(str(tmp_path / "d.npz")), reference=str(path))
    assert result.samples == 9 and result.accuracy == 1.0 and result.agreement == 1.0


def token_model(mask_type: int = onnx.TensorProto.INT64) -> onnx.ModelProto:
    """Two (N, 6) inputs, token ids (int64) and an attention mask: y = ids * mask as floats."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["i"], to=1), helper.make_node("Cast", ["attention_mask"], ["m"], to=1),
             helper.make_node("Mul", ["i", "m"], ["y"])]
    inputs = [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["N", 6]),
              helper.make_tensor_value_info("attention_mask", mask_type, ["N", 6])]
    graph = helper.make_graph(nodes, "tokens", inputs, [helper.make_tensor_value_info("y", 1, ["N", 6])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_npz_with_one_array_per_input_of_any_integer_width(tmp_path):
    """Token ids saved as int32 and a boolean mask feed int64 inputs; every input is batched and subset alike."""
    ids = np.arange(10 * 6, dtype=np.int32).reshape(10, 6)
    mask = np.arange(6)[None, :] < (np.arange(10) % 6 + 1)[:, None]
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=mask)
    d = load_data(tmp_path / "tokens.npz", token_model())
    assert {k: v.dtype for k, v in d.inputs.items()} == {"input_ids": np.int64, "attention_mask": np.int64}
    np.testing.assert_array_equal(d.inputs["input_ids"], ids)
    np.testing.assert_array_equal(d.inputs["attention_mask"], mask)
    for b in d.batches(4):  # the same rows of every input
        np.testing.assert_array_equal(b.feeds["input_ids"] // 6, np.repeat(b.feeds["input_ids"][:, :1] // 6, 6, axis=1))
        np.testing.assert_array_equal(b.feeds["attention_mask"].sum(axis=1), b.feeds["input_ids"][:, 0] // 6 % 6 + 1)
    subset = load_data(tmp_path / "tokens.npz", token_model(), samples=4, seed=2)
    rows = subset.inputs["input_ids"][:, 0] // 6
    np.testing.assert_array_equal(subset.inputs["attention_mask"], mask[rows])
    boolean = load_data(tmp_path / "tokens.npz", token_model(onnx.TensorProto.BOOL))
    assert boolean.inputs["attention_mask"].dtype == np.bool_
    np.savez(tmp_path / "wide.npz", input_ids=ids, attention_mask=mask.astype(np.int64) * 2)
    with pytest.raises(OnnxPruneError, match="values from 0 to 2; the model input attention_mask takes bool"):
        load_data(tmp_path / "wide.npz", token_model(onnx.TensorProto.BOOL))
    np.savez(tmp_path / "float.npz", input_ids=ids.astype(np.float32), attention_mask=mask)
    with pytest.raises(OnnxPruneError, match="dtype float32; the model input input_ids takes int64"):
        load_data(tmp_path / "float.npz", token_model())
    np.savez(tmp_path / "missing.npz", input_ids=ids)
    with pytest.raises(OnnxPruneError, match=r"no arrays for the model inputs \['attention_mask'\]"):
        load_data(tmp_path / "missing.npz", token_model())


@pytest.mark.parametrize("damage", ["truncated", "flipped member", "scalar x"])
def test_a_damaged_archive_is_refused_in_one_line(tmp_path, damage):
    """Found by tests/test_fuzz.py: a .npz whose zip or member is damaged, or whose x is a single value."""
    x, y = colour_images()
    path = tmp_path / "data.npz"
    if damage == "scalar x":
        np.savez(path, x=np.float32(3), y=y)
    else:
        np.savez(path, x=x, y=y)
        data = bytearray(path.read_bytes())
        if damage == "truncated":
            data = data[: len(data) // 2]
        else:  # a byte inside the first member's compressed bytes: its CRC fails when it is read
            data[60] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(OnnxPruneError):
        load_data(path, colour_model())


@pytest.mark.parametrize("as_folder", [False, True])
def test_text_is_refused_with_what_to_give_instead(tmp_path, as_folder):
    """No tokenizer travels in an ONNX file: lines of text get an error naming the token arrays to give."""
    ids = helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["N", 8])
    mask = helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["N", 8])
    out = helper.make_tensor_value_info("hidden", onnx.TensorProto.FLOAT, ["N", 8])
    graph = helper.make_graph([helper.make_node("Mul", ["input_ids", "attention_mask"], ["m"]),
                               helper.make_node("Cast", ["m"], ["hidden"], to=onnx.TensorProto.FLOAT)],
                              "tokens", [ids, mask], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    text = tmp_path / "lines.txt"
    if as_folder:
        (tmp_path / "corpus").mkdir()
        text = tmp_path / "corpus"
        (text / "a.txt").write_text("a sentence\nanother one\n")
    else:
        text.write_text("a sentence\nanother one\n")
    with pytest.raises(OnnxPruneError, match=r"no tokenizer.*input_ids \(int64, shape \['N', 8\]\).*attention_mask"):
        load_data(text, model)
