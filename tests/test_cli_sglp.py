"""prune --method sglp through the CLI (docs/algorithms.md section 3)."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.plan import load_plan
from tests.importance.test_slp import classifier

ROOT = Path(__file__).resolve().parents[1]


def test_prune_resnet20_with_sglp(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    code = main(["prune", str(ROOT / "models" / "resnet20.onnx"), "--method", "sglp", "--remove-blocks", "3",
                 "--data", str(ROOT / "models" / "cifar10_calib512.npz"), "--samples", "64", "--plot",
                 "-o", str(out), "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["method"] == "sglp" and result["target_met"]
    assert result["verification"]["passed"] and result["verification"]["finite"]
    assert len(result["removed_blocks"]) == 3 and result["macs_after"] < result["macs_before"]
    plan = load_plan(tmp_path / "r20.plan.json")
    assert plan.method == "sglp" and plan.remove_blocks == result["removed_blocks"]
    p = plan.predicted
    assert len(p["layers"]) == 10 and p["layer_blocks"][0] is None  # the stem and 9 blocks
    m = np.array(p["cka"])
    assert m.shape == (10, 10) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert p["segments_chosen_by"] == "elbow" and p["grad_norm_targets"] == "labels" and p["cka_samples"] == 64
    assert sorted(p["grad_norm"]) == sorted(j for j in p["layer_blocks"] if j)
    bounds = [s["layers"] for s in p["segments"]]
    assert bounds[0][0] == 0 and bounds[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    for segment in p["segments"]:
        removed = [j for j in segment["blocks"] if j in plan.remove_blocks]
        assert len(removed) == segment["removed"] <= segment["may_remove"]
        assert not segment["blocks"] or len(removed) < len(segment["blocks"])  # no segment is emptied
        kept = [j for j in segment["blocks"] if j not in plan.remove_blocks]
        for j in removed:  # the least important go first inside a segment
            assert all(p["grad_norm"][j] <= p["grad_norm"][k] for k in kept if k in p["grad_norm"]
                       and k in _removable(ROOT / "models" / "resnet20.onnx"))
    assert sum(s["removed"] for s in p["segments"]) == 3
    png = (tmp_path / "r20.cka.png").read_bytes()
    assert result["plot"] == str(tmp_path / "r20.cka.png") and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 10 * 12  # width: 10 layers of 12 pixels


def _removable(path):
    from onnxprune.graph.analysis import analyze_model
    from onnxprune.graph.io import load_model

    return {b.join for b in analyze_model(load_model(path)).residual_blocks if b.removable}


def test_given_segments_text_output_and_the_per_segment_floor(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save(classifier(seed=5), path)  # stem, 4 identity blocks, a projection block, one more identity block
    base = ["prune", str(path), "--method", "sglp", "--data", "random", "--samples", "16"]
    assert main(base + ["--remove-blocks", "2", "--segments", "3", "-o", str(tmp_path / "a.onnx")]) == 0
    text = capsys.readouterr().out
    assert "3 segments (given)" in text and "pseudo-labels" in text and "segment 2:" in text
    plan = load_plan(tmp_path / "a.plan.json")
    assert len(plan.predicted["segments"]) == 3 and len(plan.remove_blocks) == 2
    # 6 blocks (5 removable) in 6 segments: only the stem's segment and the projection block's keep a block each
    code = main(base + ["--remove-blocks", "6", "--segments", "7", "-o", str(tmp_path / "b.onnx"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 4 and not result["target_met"] and "segments keeps at least one block" in result["message"]
    assert all(len(s["removed"]) < len(s["blocks"]) for s in result["segments"] if s["blocks"])


@pytest.mark.parametrize("flags, refused", [
    (["--remove-blocks", "1", "--macs-reduction", "0.2"], None),  # argparse: mutually exclusive
    (["--macs-reduction", "0.2"], "--macs-reduction does not apply to --method sglp"),
    (["--remove-blocks", "1", "--one-shot"], "--one-shot does not apply to --method sglp"),
    (["--remove-blocks", "1", "--segments", "0"], "at least 1 segment"),
    (["--remove-blocks", "1", "--segments", "9"], "--segments must lie in 1..7"),
])
def test_sglp_flags_are_checked(tmp_path, capsys, flags, refused):
    path = tmp_path / "net.onnx"
    onnx.save(classifier(seed=5), path)
    args = ["prune", str(path), "--method", "sglp", "--data", "random", "--samples", "8", "-o",
            str(tmp_path / "o.onnx")] + flags
    if refused is None:
        with pytest.raises(SystemExit):
            main(args)
        return
    assert main(args) != 0
    assert refused in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()


def test_segments_and_plot_apply_to_sglp_only(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save(classifier(seed=5), path)
    for flag in (["--segments", "2"], ["--plot"]):
        assert main(["prune", str(path), "--method", "slp", "--data", "random", "--remove-blocks", "1", "-o",
                     str(tmp_path / "o.onnx")] + flag) != 0
        assert f"{flag[0]} does not apply to --method slp" in capsys.readouterr().err
