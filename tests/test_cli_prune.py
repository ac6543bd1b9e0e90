import json

import onnx

from onnxprune.cli import main
from onnxprune.plan import load_plan
from tests.importance.test_slp import classifier


def test_score_and_prune_verbs(tmp_path, capsys):
    model = tmp_path / "net.onnx"
    onnx.save(classifier(seed=5), model)
    assert main(["score", str(model), "--data", "random", "--samples", "16", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert len(scored["blocks"]) == 5 and scored["random_data"] and scored["provider"] == "cpu"
    assert {"join", "score"} <= set(scored["blocks"][0])

    out = tmp_path / "pruned.onnx"
    assert main(["prune", str(model), "--method", "slp", "--data", "random", "--samples", "16",
                 "--remove-blocks", "2", "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "RANDOM" in captured.err  # random calibration data is called out
    assert len(result["removed_blocks"]) == 2 and result["verification"]["passed"]
    assert load_plan(tmp_path / "pruned.plan.json").remove_blocks == result["removed_blocks"]

    assert main(["prune", str(model), "--data", "random", "--remove-blocks", "9", "--min-blocks-per-stage", "3",
                 "-o", str(tmp_path / "capped.onnx"), "--quiet"]) == 1
    assert "target not met" in capsys.readouterr().err
