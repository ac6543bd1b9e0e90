"""The HTML report from run dicts (onnxprune.report.html; docs/report.md): sections, structure, self-containment."""

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import onnx
import pytest

from onnxprune.graph.analysis import analyze_model
from onnxprune.report.html import render, toml_lines, write_report
from onnxprune.report.run import gather, op_counts

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Checked(HTMLParser):
    """Parses a page, checking that every element is closed in order, and collects ids, headings, the URLs of
    every src/href, and the SVG elements' text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.h2, self.urls, self.svgs = [], [], [], [], []
        self._h2 = self._svg = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.urls += [attrs[k] for k in ("src", "href", "xlink:href", "data") if attrs.get(k)]
        if tag == "h2":
            self._h2 = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "h2":
            self.h2.append(self._h2)
            self._h2 = None

    def handle_data(self, data):
        if self._h2 is not None:
            self._h2 += data


def check(page: str) -> Checked:
    """Parse ``page``; its structure is valid and it fetches nothing."""
    assert page.startswith("<!DOCTYPE html>")
    parser = Checked()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed: {parser.stack}"
    assert len(parser.ids) == len(set(parser.ids)), "duplicate ids"
    assert all(u.startswith("#") or u.startswith("data:") for u in parser.urls), parser.urls
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", page, re.I)
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):  # every chart is well-formed XML on its own
        ET.fromstring(svg)
    return parser


def full_prune_run(models) -> dict:
    """A run with every kind of data a prune can bring: layermerge rows, curve, rounds, repair, healing."""
    before, after, removed = models
    result = {
        "output": str(after), "method": "layermerge", "target_speedup": 1.3, "measured_speedup": 1.34,
        "original_latency_s": 0.002, "pruned_latency_s": 0.0015, "removed_blocks": removed,
        "merged": [["/a/Conv", "/b/Conv"], {"convs": ["/c/Conv", "/d/Conv"], "fold_identity": "/e/Add"}],
        "dropped_convs": [], "dropped_activations": ["/a/Relu"], "macs_reduction": 0.25, "target_met": True,
        "message": "", "provider": "cpu", "data": "calib.npz", "latency_batch": 8,
        "backend": {"backend": "ort-cpu", "device": "cpu", "threads": 2, "versions": {"onnxruntime": "1.0"}},
        "attempts": [{"attempt": 1, "budget_s": 0.0015, "predicted_s": 0.0014, "predicted_speedup": 1.4,
                      "measured_s": 0.0015, "original_s": 0.002, "speedup": 1.34, "importance": -0.3,
                      "rows_changed": 3}],
        "latency_rounds_s": {"original": [0.002, 0.0021, 0.0019], "pruned": [0.0015, 0.0016, 0.0014]},
        "pareto": [{"predicted_latency_s": 0.001, "predicted_speedup": 2.0, "importance": -1.0, "rows_changed": 6},
                   {"predicted_latency_s": 0.0014, "predicted_speedup": 1.4, "importance": -0.3, "rows_changed": 3},
                   {"predicted_latency_s": 0.002, "predicted_speedup": 1.0, "importance": 0.0, "rows_changed": 0}],
        "repair": {"maps": [{"source": "/x", "target": "/y", "channels": [8, 8], "error_before": 0.5,
                             "error_after": 0.1, "placed": "folded into /c/Conv"}], "samples": 64, "ridge": 0.01,
                   "sequential": True, "notes": [], "seconds": 1.0},
        "repair_agreement": {"pruned": 0.5, "repaired": 0.8},
        "before_pruning": {"agreement": 1.0, "accuracy": 0.9, "mean_kl": 0.0},
        "after_pruning": {"agreement": 0.8, "accuracy": 0.7, "mean_kl": 0.3},
        "after_healing": {"agreement": 0.95, "accuracy": 0.88, "mean_kl": 0.05}, "held_back_samples": 50,
        "verification": {"passed": True, "checker": "ok", "agreement": 0.8, "outputs": [
            {"name": "logits", "max_abs": 0.5, "cosine": 0.99}]},
        "notes": ["a <note> & more"],
    }
    plan = {"remove_blocks": removed, "predicted": {
        "latency_s": 0.0014, "importance": -0.3, "whole_s": 0.002, "fixed_s": 0.0004, "table_rows": 40,
        "rows": [{"kind": "merge", "keep": ["/a/Conv", "/b/Conv"], "drop": ["/a/Relu"], "kernel": [5, 5],
                  "latency_s": 0.0003, "original_latency_s": 0.0005, "importance": -0.1}]},
        "healing": {"best_step": 4, "history": [{"step": 0, "agreement": 0.8, "kl": 0.3},
                                                {"step": 2, "agreement": 0.9, "kl": 0.1, "loss": 1.2},
                                                {"step": 4, "agreement": 0.95, "kl": 0.05, "loss": 0.9}]}}
    run = gather("prune", result, str(before), str(after), ["prune", str(before), "--speedup", "1.3"],
                 {"speedup": 1.3, "data": "calib.npz", "repair": "linear"}, 0)
    run["plan"] = plan
    return run


def test_a_full_prune_report_has_every_section(models):
    page = render(full_prune_run(models))
    parsed = check(page)
    assert parsed.h2 == ["Model before and after", "Structure by stage", "Latency table and what the plan saves "
                         "(LayerMerge)", "Predicted trade-off curve", "Measured latency", "Accuracy and agreement",
                         "Run"]
    assert "Not part of this run: Block scores, CKA matrix and segments." in page
    for text in ("/a/Conv + /b/Conv", "identity of /e/Add folded in", "Activations dropped", "Linear maps fitted",
                 "folded into /c/Conv", "BatchNormalization", "stage 1: 8×12×12", "chosen: 1.43x predicted",
                 "median 2", "kept: step 4", "held-back agreement", "95.0%", "PASSED", "onnxruntime", "python",
                 "cpu count", "onnxprune prune", 'speedup = 1.3', "a &lt;note&gt; &amp; more"):
        assert text in page, text
    assert re.search(r"4 → 3 blocks, 8 → 6 convs", page)


def test_op_counts_follow_the_files(models):
    before, after, _ = models
    counts = op_counts(onnx.load(str(before)))
    assert counts["Conv"] == 14 and list(counts)[0] == "Conv" and sum(counts.values()) == len(
        onnx.load(str(before)).graph.node)


@pytest.mark.parametrize("verb, result, expected, never", [
    ("analyze", None, ["Model", "Structure by stage", "Residual blocks and conv chain", "Run"], "Not part of"),
    ("score", {"model": "m", "samples": 8, "feature_tensor": "f", "data": "random", "random_data": True,
               "provider": "cpu", "blocks": [{"join": "j1", "score": 0.2, "macs": 10, "params": 3},
                                             {"join": "j2", "score": 0.05, "macs": 10, "params": 3}]},
     ["Model", "Structure by stage", "Block scores (SLP)", "Run"], "Not part of"),
    ("bench", {"backend": {"backend": "ort-cpu", "device": "cpu", "threads": 1, "versions": {}}, "batch": 2,
               "rounds": 3, "runs_per_turn": 1, "speedup": 1.2,
               "models": [{"model": "a.onnx", "latency_s": 0.002, "rounds_s": [0.002, 0.0021, 0.002]},
                          {"model": "b.onnx", "latency_s": 0.0017, "rounds_s": [0.0016, 0.0017, 0.0018]}]},
     ["Model before and after", "Structure by stage", "Measured latency", "Run"], "Not part of"),
])
def test_each_verb_gets_its_sections(models, verb, result, expected, never):
    before, after, _ = models
    structure = analyze_model(onnx.load(str(before))).to_dict()
    run = gather(verb, result if result is not None else structure, str(before),
                 str(after) if verb == "bench" else None, [verb, str(before)], structure=structure)
    page = render(run)
    assert check(page).h2 == expected
    assert never not in page  # what the verb never has is not listed as missing


def test_sglp_scores_and_cka_matrix(models):
    before, after, removed = models
    run = gather("prune", {"method": "sglp", "removed_blocks": removed, "target_met": True}, str(before), str(after))
    run["plan"] = {"predicted": {"cka": [[1, 0.5], [0.5, 1]], "layers": ["stem", "b1"], "cka_samples": 16,
                                 "segments": [{"layers": [0, 1], "blocks": [], "removable": 0, "removed": 0},
                                              {"layers": [1, 2], "blocks": ["b1"], "removable": 1, "removed": 1}],
                                 "segment_losses": [1.0, 0.2, 0.1], "segments_chosen_by": "elbow",
                                 "grad_norm": {"b1": 0.3, removed[0]: 0.1}, "grad_norm_targets": "labels"}}
    parsed = check(render(run))
    assert "CKA matrix and segments (SGLP)" in parsed.h2 and "Block scores (SGLP GradNorm)" in parsed.h2
    assert "K = 2 (elbow)" in render(run)


def test_write_report_is_atomic_and_leaves_no_temporary_file(models, tmp_path):
    run = full_prune_run(models)
    path = write_report(tmp_path / "deep" / "r.html", run)
    assert path.read_text() == render(run) and sorted(p.name for p in path.parent.iterdir()) == ["r.html"]


def test_a_result_that_closes_a_script_element_cannot_break_out_of_it(models):
    before, _, _ = models
    run = gather("score", {"model": "</script><script>alert(1)</script>", "blocks": []}, str(before))
    page = render(run)
    assert "<script>alert" not in page and page.count("</script>") == 1
    check(page)


def test_toml_lines_read_back_as_the_config():
    import tomllib

    config = {"speedup": 1.5, "data": 'a "b".npz', "one-shot": True, "input-shape": [3, 32, 32]}
    assert tomllib.loads(toml_lines(config)) == config
