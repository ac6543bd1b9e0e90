import numpy as np
import onnxruntime as ort
import pytest

from onnxprune.errors import OnnxPruneError
from onnxprune.runtime.session import create_session
from tests.builders import GraphBuilder
from tests.conftest import run


def small_model():
    g = GraphBuilder(("N", 3, 6, 6))
    return g.build([g.relu(g.conv(g.input, 4))])


def test_cpu_session_reports_cpu_and_runs_like_onnxruntime(tmp_path):
    model = small_model()
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    session = create_session(model, "cpu", threads=1)
    assert session.provider == "cpu" and session.threads == 1
    assert session.input_names == ["input"] and len(session.output_names) == 1
    np.testing.assert_allclose(session.run({"input": x})[0], run(model, {"input": x})[0], atol=1e-6)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert create_session(path, "cpu").provider == "cpu"  # a path works as well as a ModelProto


def test_spinning_is_off_unless_asked():
    model = small_model()
    off = create_session(model, "cpu").session.get_session_options()
    on = create_session(model, "cpu", spinning=True).session.get_session_options()
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert on.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert off.enable_cpu_mem_arena and not create_session(model, "cpu", arena=False).session.get_session_options().enable_cpu_mem_arena


def test_auto_reports_the_provider_really_used():
    session = create_session(small_model(), "auto")
    assert session.provider == ("cuda" if session.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_asking_for_cuda_without_it_is_an_error_not_a_silent_fallback():
    with pytest.raises(OnnxPruneError, match="cuda"):
        create_session(small_model(), "cuda")


def test_unknown_provider_and_broken_model_are_one_line_errors():
    with pytest.raises(OnnxPruneError, match="unknown provider"):
        create_session(small_model(), "tpu")
    broken = small_model()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(OnnxPruneError, match="could not create a session") as info:
        create_session(broken, "cpu")
    assert "\n" not in str(info.value)


def test_a_model_over_the_protobuf_limit_goes_through_a_file(monkeypatch):
    from onnxprune.graph import io

    model = small_model()
    x = np.ones((1, 3, 6, 6), np.float32)
    expected = run(model, {"input": x})[0]
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 2**24 + 1)  # anything over 1 byte of weights is "too big"
    assert io.over_protobuf_limit(model)
    session = create_session(model, "cpu")  # the temporary file is gone once the session exists
    np.testing.assert_allclose(session.run({"input": x})[0], expected, atol=1e-6)


def test_a_model_onnxruntime_cannot_run_is_a_one_line_input_error():
    """Found by tests/test_fuzz.py: a conv whose group no longer fits its weights fails only when it runs."""
    g = GraphBuilder((1, 4, 8, 8))
    model = g.build([g.conv(g.input, 4)])
    next(a for a in model.graph.node[0].attribute if a.name == "group").i = 2
    session = create_session(model, "cpu")
    with pytest.raises(OnnxPruneError, match="onnxruntime could not run the model"):
        session.run({"input": np.zeros((1, 4, 8, 8), np.float32)})
