import importlib.util
import json

import onnxruntime as ort
import pytest

from onnxprune.errors import OnnxPruneError
from onnxprune.graph.analysis import analyze_model
from onnxprune.graph.normalize import to_graph
from onnxprune.latency.backends import BackendUnavailable, get_backend
from onnxprune.latency.measure import compare, random_feeds
from onnxprune.latency.table import build_table, load_table, row_model, row_signature
from onnxprune.plan import fingerprint
from onnxprune.planning.candidates import conv_l1_norms, enumerate_options
from tests.conftest import run
from tests.planning.test_candidates import chain_model


@pytest.fixture(scope="module")
def chain():
    model = chain_model(3)
    s = analyze_model(model)
    return model, s, enumerate_options(s, conv_l1_norms(to_graph(model)))


def test_row_models_have_the_real_output_shape(chain):
    model, s, options = chain
    for option in options:
        if option.remove_block:
            assert row_signature(option, s, 2) is None
            continue
        row = row_model(option, s, batch=2)
        (y,) = run(row, random_feeds(row, 2))
        last = s.convs[option.end - 1]
        assert list(y.shape) == [2, last.out_channels] + last.output_shape[2:], option


def test_identical_rows_share_a_signature(chain):
    model, s, options = chain
    blocks = [o for o in options if o.fold_identity and len(o.keep) == 2]
    assert len(blocks) == 2 and row_signature(blocks[0], s, 1) == row_signature(blocks[1], s, 1)


def test_table_predicts_the_original_and_round_trips(chain, tmp_path):
    model, s, options = chain
    backend = get_backend("ort-cpu", threads=1)
    table = build_table(model, s, options, backend, 2, fingerprint(model), warmup=1, rounds=3)
    assert table.backend["threads"] == 1 and table.batch == 2 and table.dtype == "float32" and table.rounds == 3
    distinct = {row_signature(o, s, 2) for o in options} - {None}
    assert set(table.rows) == distinct and all(v > 0 for v in table.rows.values())
    originals = [o for o in options if o.original]
    assert table.predict(originals, s) == pytest.approx(table.whole_s)
    path = table.save(tmp_path / "t.json")
    assert load_table(path, fingerprint(model)).rows == table.rows
    with pytest.raises(OnnxPruneError, match="another model"):
        load_table(path, "sha256:other")
    data = json.loads(path.read_text())
    data["schema"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(OnnxPruneError, match="schema"):
        load_table(path, fingerprint(model))


def test_compare_takes_turns_and_reports_each_model(chain):
    model, _, _ = chain
    measured = compare([model, model], get_backend("ort-cpu", threads=1), batch=1, rounds=3)
    assert len(measured.medians) == 2 and all(m > 0 for m in measured.medians)
    assert measured.speedups[0] == 1.0 and measured.speedups[1] > 0 and measured.rounds == 3


@pytest.mark.parametrize("name", ["ort-cuda", "ort-tensorrt", "tensorrt"])
def test_gpu_backends_explain_why_they_cannot_run(name):
    if name.startswith("ort") and name.replace("ort-", "").upper() in "".join(ort.get_available_providers()).upper():
        pytest.skip(f"{name} is available here: the GPU benchmark covers it")
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(BackendUnavailable, match="needs"):
        get_backend(name)


def test_gpu_backend_times_a_model_when_there_is_one(chain):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no onnxruntime CUDA provider on this machine (onnxruntime-gpu and a GPU are needed)")
    model, _, _ = chain
    assert get_backend("ort-cuda").time(model, random_feeds(model, 2), 2, 5) > 0


def test_cuda_capture_uses_io_binding_and_matches_cpu(chain):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no onnxruntime CUDA provider on this machine (onnxruntime-gpu and a GPU are needed)")
    from onnxprune.runtime.session import create_session

    model, _, _ = chain
    feeds = random_feeds(model, 2)
    cpu, cuda = create_session(model, "cpu"), create_session(model, "cuda")
    assert cuda.provider == "cuda"
    assert abs(cpu.run(feeds)[0] - cuda.run(feeds)[0]).max() < 1e-3
