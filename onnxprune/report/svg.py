"""Charts as inline SVG, drawn by hand (no plotting library): the pictures of the HTML report (docs/report.md).

Each function is pure and returns one ``<svg>`` element as a string, with its own size, text in the page's font
and nothing fetched from anywhere, so that it can be pasted into an HTML page or saved as a ``.svg`` file (the
``xmlns`` is set; every text is escaped). Colours: the same dark-blue-to-yellow ramp as the PNG pictures
(``onnxprune.report.png.colours``) for matrices, ``PALETTE`` for series.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxprune.report.png import colours

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#7f7f7f")
HIGHLIGHT, MUTED, BOUNDARY = "#d62728", "#9fb6cd", "#d62728"
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif" font-size="12"'


# Characters XML 1.0 does not allow at all (control characters, lone surrogates, U+FFFE, U+FFFF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(text: object) -> str:
    """``text`` escaped for XML (and HTML) content and attribute values; characters XML cannot hold become '?'."""
    return html.escape(_NOT_XML.sub("?", str(text)), quote=True)


def _svg(width: float, height: float, body: list[str], title: str = "") -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" {FONT} role="img">')
    return "".join([head, f"<title>{esc(title)}</title>" if title else "", *body, "</svg>"])


def _text(x: float, y: float, text: object, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{" " + extra if extra else ""}>{esc(text)}</text>'


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering ``low``..``high``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((high - first) / step + 1e-9) + 1)]


def fmt(value: float) -> str:
    """A tick or value label: 3 significant digits, no trailing zeros."""
    return f"{value:.3g}"


def _scale(value: float, low: float, high: float, a: float, b: float) -> float:
    return a + (value - low) / (high - low) * (b - a) if high > low else (a + b) / 2


def _range(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high == low:
        return low - 0.5 if low == 0 else low * 0.95, high + 0.5 if high == 0 else high * 1.05
    margin = (high - low) * pad
    return low - margin, high + margin


@dataclass(frozen=True)
class Series:
    """A named line of points (x, y), drawn in ``colour`` (default: the palette in order)."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: str | None = None
    dots: bool = False  # a dot at every point as well
    line: bool = True  # False: dots alone (points that are not a curve)


@dataclass(frozen=True)
class Mark:
    """A point drawn as a ringed dot with a label beside it (the chosen plan on a trade-off curve)."""

    x: float
    y: float
    label: str
    colour: str = HIGHLIGHT


def line_chart(series: Sequence[Series], x_label: str, y_label: str, marks: Sequence[Mark] = (),
               width: int = 640, height: int = 300, x_range: tuple[float, float] | None = None,
               y_range: tuple[float, float] | None = None, title: str = "") -> str:
    """Lines with axes, round ticks, a legend (when there are several series) and marked points."""
    left, right, top, bottom = 64, 16, 28 if len(series) > 1 else 12, 44
    xs = [x for s in series for x in s.xs] + [m.x for m in marks]
    x0, x1 = x_range or _range(xs, 0.02)
    ys = [y for s in series for x, y in zip(s.xs, s.ys) if x0 <= x <= x1] + [m.y for m in marks]
    y0, y1 = y_range or _range(ys)
    px = lambda v: _scale(v, x0, x1, left, width - right)  # noqa: E731
    py = lambda v: _scale(v, y0, y1, height - bottom, top)  # noqa: E731
    body = [_frame(left, top, width - right, height - bottom), *_y_axis(y0, y1, py, left, width - right, y_label),
            *_x_axis(x0, x1, px, top, height - bottom, x_label)]
    legend_x = left + 8
    for k, s in enumerate(series):
        colour = s.colour or PALETTE[k % len(PALETTE)]
        points = [(px(x), py(y)) for x, y in zip(s.xs, s.ys)  # what lies outside a given x range is left out
                  if math.isfinite(x) and math.isfinite(y) and x0 <= x <= x1]
        if len(points) > 1 and s.line:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if s.dots or not s.line or len(points) == 1:
            radius = 2.5 if s.line else 4
            body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{colour}"/>' for x, y in points]
        if len(series) > 1:
            body.append(f'<rect x="{legend_x}" y="8" width="14" height="4" fill="{colour}"/>' if s.line else
                        f'<circle cx="{legend_x + 7}" cy="10" r="3" fill="{colour}"/>')
            body.append(_text(legend_x + 18, 14, s.name))
            legend_x += 18 + 7 * len(s.name) + 16  # about 7 pixels a character at 12 px
    for m in marks:
        x, y = px(m.x), py(m.y)
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{m.colour}" stroke-width="2"/>')
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{m.colour}"/>')
        anchor = "end" if x > width * 0.6 else "start"
        below = y < top + 24  # a label above the frame would leave the picture
        body.append(_text(x + (-10 if anchor == "end" else 10), y + 20 if below else y - 8, m.label, anchor,
                          f'fill="{m.colour}" font-weight="bold"'))
    return _svg(width, height, body, title)


def _frame(left: float, top: float, right_x: float, bottom_y: float) -> str:
    return (f'<rect x="{left}" y="{top}" width="{right_x - left}" height="{bottom_y - top}" fill="#fff" '
            'stroke="#888"/>')


def _x_axis(x0: float, x1: float, px, top: float, bottom_y: float, label: str) -> list[str]:
    """Vertical grid lines at round ticks of x, their labels under ``bottom_y``, and the axis title."""
    body = []
    ticks = nice_ticks(x0, x1, 6)
    for t in ticks:
        x = px(t)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom_y}" stroke="#eee"/>')
        body.append(_text(x, bottom_y + 16, fmt(t), "middle"))
    middle = (px(x0) + px(x1)) / 2
    body.append(_text(middle, bottom_y + 34, label, "middle"))
    return body


def _y_axis(y0: float, y1: float, py, left: float, right_x: float, label: str) -> list[str]:
    """Horizontal grid lines at round ticks of y, their labels left of ``left``, and the axis title."""
    body = []
    for t in nice_ticks(y0, y1):
        y = py(t)
        body.append(f'<line x1="{left}" x2="{right_x}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        body.append(_text(left - 6, y + 4, fmt(t), "end"))
    middle = (py(y0) + py(y1)) / 2
    body.append(_text(14, middle, label, "middle", f'transform="rotate(-90 14 {middle:.1f})"'))
    return body


def bar_chart(labels: Sequence[str], values: Sequence[float], highlight: Sequence[int] = (), value_label: str = "",
              width: int = 640, bar: int = 16, label_width: int = 220, title: str = "") -> str:
    """Horizontal bars, one per label (top to bottom), the bars at ``highlight`` indices in red, each value
    written at its bar's end; zero at the left edge (negative values are drawn from zero to the left)."""
    chosen = set(highlight)
    gap, top = 4, 20
    height = top + len(labels) * (bar + gap) + 8
    low, high = min([0.0, *values]), max([0.0, *values])
    span_right = width - 70
    px = lambda v: _scale(v, low, high, label_width, span_right) if high > low else label_width  # noqa: E731
    body = [_text(label_width, 13, value_label, "start", 'fill="#555"')]
    for k, (label, value) in enumerate(zip(labels, values)):
        y = top + k * (bar + gap)
        a, b = sorted((px(0.0), px(value)))
        colour = HIGHLIGHT if k in chosen else MUTED
        short = label if len(label) <= 34 else "…" + label[-33:]
        body.append(f'<text x="{label_width - 6}" y="{y + bar - 4}" text-anchor="end"><title>{esc(label)}</title>'
                    f'{esc(short)}</text>')
        body.append(f'<rect x="{a:.1f}" y="{y}" width="{max(b - a, 1):.1f}" height="{bar}" fill="{colour}"/>')
        body.append(_text(b + 4, y + bar - 4, fmt(value)))
    return _svg(width, height, body, title)


def heatmap(matrix: Sequence[Sequence[float]], boundaries: Sequence[int] = (), size: int = 420,
            labels: Sequence[str] = (), title: str = "") -> str:
    """A square matrix as coloured cells (dark blue = its lowest value, yellow = its highest), red lines before
    every index in ``boundaries`` (SGLP's segment starts) both ways, a colour scale beside it, and every
    ``labels[k]`` as the tooltip of row k."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError("a heatmap needs a non-empty 2-D matrix")
    rows, cols = m.shape
    cell = max(2.0, size / max(rows, cols))
    rgb = colours(m)
    low, high = float(np.nanmin(m)), float(np.nanmax(m))
    pad = 24
    body = []
    for i in range(rows):
        tip = f"<title>{esc(labels[i])}</title>" if i < len(labels) else ""
        body.append(f"<g>{tip}")
        for j in range(cols):
            r, g, b = (int(c) for c in rgb[i, j])
            body.append(f'<rect x="{pad + j * cell:.2f}" y="{pad + i * cell:.2f}" width="{cell + 0.3:.2f}" '
                        f'height="{cell + 0.3:.2f}" fill="#{r:02x}{g:02x}{b:02x}"/>')
        body.append("</g>")
    for k in boundaries:
        if 0 < k < max(rows, cols):
            at = pad + k * cell
            body.append(f'<line x1="{at:.1f}" x2="{at:.1f}" y1="{pad}" y2="{pad + rows * cell:.1f}" '
                        f'stroke="{BOUNDARY}" stroke-width="2"/>')
            body.append(f'<line y1="{at:.1f}" y2="{at:.1f}" x1="{pad}" x2="{pad + cols * cell:.1f}" '
                        f'stroke="{BOUNDARY}" stroke-width="2"/>')
    for k in range(0, rows, max(1, rows // 8)):  # index labels along both sides
        body.append(_text(pad - 4, pad + (k + 0.5) * cell + 4, k, "end", 'font-size="10"'))
        body.append(_text(pad + (k + 0.5) * cell, pad - 6, k, "middle", 'font-size="10"'))
    scale_x = pad + cols * cell + 18
    steps = 32
    ramp = colours(np.linspace(low, high, steps), low, high)
    for k in range(steps):
        r, g, b = (int(c) for c in ramp[steps - 1 - k])
        body.append(f'<rect x="{scale_x:.1f}" y="{pad + k * rows * cell / steps:.2f}" width="14" '
                    f'height="{rows * cell / steps + 0.5:.2f}" fill="#{r:02x}{g:02x}{b:02x}"/>')
    body.append(_text(scale_x + 18, pad + 10, fmt(high)))
    body.append(_text(scale_x + 18, pad + rows * cell, fmt(low)))
    return _svg(scale_x + 70, pad + rows * cell + 8, body, title)


def box_plot(groups: Sequence[tuple[str, Sequence[float]]], value_label: str, width: int = 640,
             title: str = "") -> str:
    """One horizontal box per group on a shared axis: the box from the first to the third quartile, a thick line
    at the median (written beside it), whiskers to the smallest and largest value, and every value as a dot."""
    groups = [(name, [v for v in values if math.isfinite(v)]) for name, values in groups]
    left, right, top, row = 150, 24, 10, 46
    height = top + row * len(groups) + 40
    x0, x1 = _range([v for _, values in groups for v in values], 0.06)
    px = lambda v: _scale(v, x0, x1, left, width - right)  # noqa: E731
    body = [_frame(left, top, width - right, height - 40), *_x_axis(x0, x1, px, top, height - 40, value_label)]
    for k, (name, values) in enumerate(groups):
        y = top + row * k + row / 2
        body.append(_text(left - 8, y + 4, name, "end"))
        if not values:
            continue
        q1, median, q3 = (float(q) for q in np.percentile(values, [25, 50, 75]))
        colour = PALETTE[k % len(PALETTE)]
        body.append(f'<line x1="{px(min(values)):.1f}" x2="{px(max(values)):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                    f'stroke="{colour}"/>')
        for v in (min(values), max(values)):
            body.append(f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{y - 7:.1f}" y2="{y + 7:.1f}" '
                        f'stroke="{colour}"/>')
        body.append(f'<rect x="{px(q1):.1f}" y="{y - 12:.1f}" width="{max(px(q3) - px(q1), 1):.1f}" height="24" '
                    f'fill="{colour}" fill-opacity="0.18" stroke="{colour}"/>')
        body.append(f'<line x1="{px(median):.1f}" x2="{px(median):.1f}" y1="{y - 12:.1f}" y2="{y + 12:.1f}" '
                    f'stroke="{colour}" stroke-width="3"/>')
        for j, v in enumerate(values):  # a small deterministic jitter keeps equal values apart
            body.append(f'<circle cx="{px(v):.1f}" cy="{y + ((j * 7) % 13 - 6) * 0.9:.1f}" r="2" fill="{colour}" '
                        'fill-opacity="0.6"/>')
        body.append(_text(px(median), y - 16, f"median {fmt(median)}", "middle", f'fill="{colour}"'))
    return _svg(width, height, body, title)


# How a cell of ``cell_rows`` is drawn, by its state.
CELL_STYLES = {
    "kept": 'fill="#4c78a8" stroke="#2f4b6e"',
    "removed": f'fill="#fff" stroke="{HIGHLIGHT}" stroke-dasharray="3 2" stroke-width="1.5"',
    "fixed": 'fill="#bbb" stroke="#888"',
}


@dataclass(frozen=True)
class CellRow:
    """A row of ``cell_rows``: a label, one state per cell (a key of CELL_STYLES), a note after the cells, and
    tooltips (one per cell, optional)."""

    label: str
    cells: Sequence[str]
    note: str = ""
    tips: Sequence[str] = ()


def cell_rows(rows: Sequence[CellRow], cell: int = 18, label_width: int = 190, width: int = 900,
              title: str = "") -> str:
    """Rows of small squares (a stage's blocks: kept, removed) with a label before and a note after each row,
    and a legend of the states used."""
    gap, row_h, top = 3, cell + 12, 26
    longest = max([len(r.cells) for r in rows] or [0])
    note_x = label_width + longest * (cell + gap) + 12
    width = max(width, int(note_x + 8 * max([len(r.note) for r in rows] or [0])))
    body, used = [], []
    for k, r in enumerate(rows):
        y = top + k * row_h
        body.append(_text(label_width - 8, y + cell - 4, r.label, "end"))
        for j, state in enumerate(r.cells):
            used += [state] if state not in used else []
            tip = f"<title>{esc(r.tips[j])}</title>" if j < len(r.tips) else ""
            x = label_width + j * (cell + gap)
            body.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" rx="2" '
                        f'{CELL_STYLES.get(state, CELL_STYLES["fixed"])}>{tip}</rect>')
            if state == "removed":
                body.append(f'<path d="M{x + 4} {y + 4} L{x + cell - 4} {y + cell - 4} M{x + cell - 4} {y + 4} '
                            f'L{x + 4} {y + cell - 4}" stroke="{HIGHLIGHT}" stroke-width="1.5"/>')
        body.append(_text(note_x, y + cell - 4, r.note))
    for j, state in enumerate(used):  # legend
        x = label_width + j * 110
        style = CELL_STYLES.get(state, CELL_STYLES["fixed"])
        body.append(f'<rect x="{x}" y="4" width="12" height="12" rx="2" {style}/>')
        body.append(_text(x + 18, 14, state))
    return _svg(width, top + len(rows) * row_h + 4, body, title)
