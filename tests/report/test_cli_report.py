"""``--report OUT.html`` on prune, heal, score, analyze and bench (docs/report.md), through the CLI."""

import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import REPORT_SHOWS, build_parser, main
from onnxprune.plan import load_plan
from tests.importance.test_slp import classifier
from tests.report.test_html import check
from tests.test_speedup import deep_net


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The small test classifier and labelled float data shaped for it."""
    folder = tmp_path_factory.mktemp("cli_report")
    onnx.save(classifier(seed=5), folder / "net.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.standard_normal((48, 3, 12, 12)).astype(np.float32),
             y=rng.integers(0, 10, 48))
    return folder


def report(path) -> tuple[str, list[str]]:
    page = path.read_text()
    return page, check(page).h2


def test_every_verb_documents_report_in_its_help():
    verbs = {name: sub for name, sub in build_parser()._subparsers._group_actions[0].choices.items()}
    assert set(REPORT_SHOWS) == {"prune", "heal", "score", "analyze", "bench"}
    for name in REPORT_SHOWS:
        assert "--report OUT.html" in verbs[name].format_help() and "HTML report" in verbs[name].format_help()
    assert "--report" not in verbs["eval"].format_help()


def test_prune_slp_report(files, tmp_path, capsys):
    out, html = tmp_path / "p.onnx", tmp_path / "r" / "p.html"
    code = main(["prune", str(files / "net.onnx"), "--data", "random", "--samples", "16", "--remove-blocks", "2",
                 "-o", str(out), "--json", "--report", str(html)])
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is still the one JSON object
    assert code == 0 and f"report: {html}" in captured.err
    page, sections = report(html)
    assert sections == ["Model before and after", "Structure by stage", "Block scores (SLP)",
                        "Accuracy and agreement", "Run"]
    assert all(j in page for j in result["removed_blocks"]) and "--report" in page  # the exact command
    plan = load_plan(tmp_path / "p.plan.json")
    assert "report" not in plan.config["prune"]  # how the run reports is not part of what it does
    assert [s["join"] for s in plan.predicted["scores"]] and len(plan.predicted["scores"]) == 5


def test_a_missed_target_still_writes_the_report(files, tmp_path, capsys):
    html = tmp_path / "missed.html"
    code = main(["prune", str(files / "net.onnx"), "--data", "random", "--remove-blocks", "9",
                 "--min-blocks-per-stage", "3", "-o", str(tmp_path / "m.onnx"), "--quiet", "--report", str(html)])
    assert code == 4
    page, _ = report(html)
    assert "TARGET MISSED" in page and "stopped after" in page


@pytest.mark.parametrize("argv", [
    ["prune", "{net}", "--data", "random", "--remove-blocks", "1", "--feature-tensor", "nope", "-o", "{out}"],
    ["score", "{net}", "--data", "random", "--feature-tensor", "nope"],
    ["analyze", "{tmp}/missing.onnx"],
    ["bench", "{tmp}/missing.onnx"],
    ["heal", "{net}", "--teacher", "{net}", "--data", "random", "-o", "{out}"],
])
def test_no_report_when_the_run_fails(files, tmp_path, capsys, argv):
    html = tmp_path / "r.html"
    argv = [a.format(net=files / "net.onnx", out=tmp_path / "o.onnx", tmp=tmp_path) for a in argv]
    assert main(argv + ["--report", str(html)]) == 2
    assert "onnxprune: error:" in capsys.readouterr().err
    assert not html.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_report_path_that_is_a_model_is_refused_before_anything_runs(files, tmp_path, capsys):
    net = files / "net.onnx"
    before = net.read_bytes()
    assert main(["analyze", str(net), "--report", str(net)]) == 2
    assert "--report" in capsys.readouterr().err and net.read_bytes() == before
    out = tmp_path / "o.onnx"
    assert main(["prune", str(net), "--data", "random", "--remove-blocks", "1", "-o", str(out), "--report",
                 str(out)]) == 2
    assert not out.exists()


def test_score_and_analyze_reports(files, tmp_path, capsys):
    net = str(files / "net.onnx")
    assert main(["score", net, "--data", "random", "--samples", "8", "--report", str(tmp_path / "s.html")]) == 0
    page, sections = report(tmp_path / "s.html")
    assert sections == ["Model", "Structure by stage", "Block scores (SLP)", "Run"] and "Ranked" in page
    assert main(["analyze", net, "--report", str(tmp_path / "a.html")]) == 0
    page, sections = report(tmp_path / "a.html")
    assert sections == ["Model", "Structure by stage", "Residual blocks and conv chain", "Run"]
    assert "removable" in page and "conv chain (13 convs" in page


def test_layermerge_and_bench_reports(tmp_path, capsys):
    path, out = tmp_path / "deep.onnx", tmp_path / "fast.onnx"
    onnx.save(deep_net(1), path)
    code = main(["prune", str(path), "--speedup", "1.25", "--data", "random", "--samples", "16", "--latency-batch",
                 "8", "--rounds", "3", "--threads", "1", "-o", str(out), "--quiet", "--json",
                 "--report", str(tmp_path / "lm.html")])
    result = json.loads(capsys.readouterr().out)
    assert code in (0, 4) and len(result["latency_rounds_s"]["original"]) == 3 and result["pareto"]
    page, sections = report(tmp_path / "lm.html")
    for title in ("Model before and after", "Structure by stage", "Latency table and what the plan saves (LayerMerge)",
                  "Predicted trade-off curve", "Measured latency", "Accuracy and agreement", "Run"):
        assert title in sections
    assert "chosen:" in page and "median" in page
    plan = json.loads((tmp_path / "fast.plan.json").read_text())
    assert all("original_latency_s" in row for row in plan["predicted"]["rows"])
    assert plan["predicted"]["whole_s"] > plan["predicted"]["fixed_s"] >= 0

    assert main(["bench", str(path), str(out), "--batch", "2", "--rounds", "3", "--threads", "1",
                 "--report", str(tmp_path / "b.html")]) == 0
    page, sections = report(tmp_path / "b.html")
    assert sections == ["Model before and after", "Structure by stage", "Measured latency", "Run"]
    assert page.count("one dot per round") == 1


def test_sglp_report_draws_the_cka_matrix(files, tmp_path, capsys):
    assert main(["prune", str(files / "net.onnx"), "--method", "sglp", "--data", "random", "--samples", "16",
                 "--remove-blocks", "2", "--segments", "3", "-o", str(tmp_path / "g.onnx"), "--quiet",
                 "--report", str(tmp_path / "g.html")]) == 0
    page, sections = report(tmp_path / "g.html")
    assert "CKA matrix and segments (SGLP)" in sections and "Block scores (SGLP GradNorm)" in sections


def test_heal_and_prune_with_healing_reports(files, tmp_path, capsys):
    pytest.importorskip("torch")
    net, data = str(files / "net.onnx"), str(files / "data.npz")
    pruned = tmp_path / "p.onnx"
    heal = ["--heal-steps", "4", "--heal-batch", "8"]
    assert main(["prune", net, "--data", data, "--remove-blocks", "1", "--heal-data", data, *heal, "-o",
                 str(pruned), "--quiet", "--report", str(tmp_path / "ph.html")]) == 0
    page, sections = report(tmp_path / "ph.html")
    assert "Accuracy and agreement" in sections and "healed" in page and "held-back agreement" in page
    assert main(["heal", str(pruned), "--teacher", net, "--data", data, "--steps", "4", "--heal-batch", "8",
                 "-o", str(tmp_path / "h.onnx"), "--quiet", "--report", str(tmp_path / "h.html")]) == 0
    page, sections = report(tmp_path / "h.html")
    assert sections[0] == "Model before and after" and "Accuracy and agreement" in sections
    assert "loss (mean since the last evaluation)" in page and "kept: step" in page
