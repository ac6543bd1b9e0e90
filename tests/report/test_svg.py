import math
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.report import svg
from onnxprune.report.svg import CellRow, Mark, Series

NS = "{http://www.w3.org/2000/svg}"


def parse(text: str) -> ET.Element:
    root = ET.fromstring(text)  # well-formed XML, or it raises
    assert root.tag == f"{NS}svg" and float(root.get("width")) > 0 and float(root.get("height")) > 0
    return root


def test_line_chart_draws_every_series_and_the_marked_point():
    root = parse(svg.line_chart([Series("a", [1, 2, 3], [0.1, 0.5, 0.2]), Series("b <&>", [1, 3], [0.3, 0.4])],
                                "speed-up", "importance", [Mark(2, 0.5, "chosen 2.0x")], title="t"))
    assert len(root.findall(f"{NS}polyline")) == 2
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "chosen 2.0x" in texts and "b <&>" in texts  # escaped in the file, read back as written
    assert "speed-up" in texts and "importance" in texts


def test_bar_chart_highlights_and_keeps_long_names_in_tooltips():
    long = "/layers/layers.12/very/long/name/of/a/join/node/Add"
    root = parse(svg.bar_chart([long, "b", "c"], [0.2, -0.1, 0.0], highlight=[0], value_label="score"))
    fills = [r.get("fill") for r in root.iter(f"{NS}rect")]
    assert fills.count(svg.HIGHLIGHT) == 1 and fills.count(svg.MUTED) == 2
    assert long in [t.text for t in root.iter(f"{NS}title")]


def test_heatmap_has_a_cell_per_entry_and_a_line_per_boundary():
    matrix = [[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]]
    root = parse(svg.heatmap(matrix, boundaries=[0, 1, 3], labels=["stem", "b1", "b2"]))
    lines = [line for line in root.iter(f"{NS}line") if line.get("stroke") == svg.BOUNDARY]
    assert len(lines) == 2  # boundary 1 both ways; 0 and the size draw nothing
    with pytest.raises(ValueError):
        svg.heatmap([])


def test_box_plot_and_cell_rows_are_well_formed():
    parse(svg.box_plot([("original", [1.0, 1.2, 1.1, 5.0]), ("pruned", [0.7, 0.8]), ("empty", [])], "ms"))
    root = parse(svg.cell_rows([CellRow("stage 1: 16×32×32", ["kept", "removed", "kept"], "3 → 2 blocks",
                                        ["a", "b", "c"]), CellRow("stage 2", ["fixed"] * 2)]))
    assert sum(1 for r in root.iter(f"{NS}rect") if r.get("stroke-dasharray")) >= 1  # the removed block


@settings(max_examples=60, deadline=None)
@given(st.floats(-1e6, 1e6, allow_nan=False), st.floats(1e-6, 1e6))
def test_nice_ticks_cover_the_range_in_round_steps(low, span):
    ticks = svg.nice_ticks(low, low + span)
    assert 1 <= len(ticks) <= 12
    noise = 1e-6 * span + 1e-9 * abs(low)  # a tick may sit on an end to within float noise
    assert all(low - noise <= t <= low + span + noise for t in ticks)
    if len(ticks) > 1:
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-3  # float noise of large offsets


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20), st.text(max_size=20))
def test_charts_of_any_values_and_names_are_well_formed_xml(values, name):
    xs = list(range(len(values)))
    parse(svg.line_chart([Series(name, xs, values)], name, name, [Mark(0, values[0], name)]))
    parse(svg.bar_chart([name] * len(values), values))
    parse(svg.box_plot([(name, values)], name))
