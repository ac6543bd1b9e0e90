"""PNG pictures without a plotting library: numpy, zlib and struct (``prune --method sglp --plot``, and the
theta trajectories of ``train-prune``: ``line_plot``).

``write_png`` encodes an (h, w, 3) uint8 array as an 8-bit RGB PNG (filter 0 on every row, one IDAT chunk).
``heatmap`` turns a matrix into such an array: each cell a square of ``cell`` pixels, coloured from dark blue (the
matrix's lowest value) through teal and green to yellow (its highest), with lines in red at given boundaries
(SGLP's segment starts) across the whole picture, both ways.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Dark blue -> teal -> green -> yellow (the ends of viridis), interpolated linearly.
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
BOUNDARY = (255, 0, 0)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """The PNG file of an (h, w, 3) uint8 array."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"expected an (h, w, 3) image, not shape {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB), no interlace
    data = zlib.compress(rows.tobytes(), 9)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    from onnxprune.outputs import write_bytes

    write_bytes(path, encode_png(rgb))


def colours(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """values -> uint8 RGB (shape + (3,)), ``low``..``high`` (default: the values' range) over the colour ramp."""
    v = np.asarray(values, dtype=np.float64)
    low = float(np.nanmin(v)) if low is None else low
    high = float(np.nanmax(v)) if high is None else high
    t = np.clip((v - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(v)
    t = np.nan_to_num(t) * (len(_STOPS) - 1)
    i = np.minimum(t.astype(np.int64), len(_STOPS) - 2)
    f = (t - i)[..., None]
    return np.round(_STOPS[i] * (1 - f) + _STOPS[i + 1] * f).astype(np.uint8)


def heatmap(matrix: np.ndarray, boundaries: list[int] = (), cell: int = 12, line: int = 2) -> np.ndarray:
    """(n*cell, m*cell, 3) uint8: ``matrix`` as coloured squares, and a ``line``-pixel line before every row and column
    index in ``boundaries`` (0 and the size excepted)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError("a heatmap needs a 2-D matrix")
    image = np.repeat(np.repeat(colours(m), cell, axis=0), cell, axis=1)
    for b in boundaries:
        if 0 < b < m.shape[0]:
            image[b * cell - line // 2: b * cell - line // 2 + line, :] = BOUNDARY
        if 0 < b < m.shape[1]:
            image[:, b * cell - line // 2: b * cell - line // 2 + line] = BOUNDARY
    return image


def cka_plot(path: str | Path, matrix, starts: list[int], cell: int = 12) -> str:
    """Write the CKA matrix with lines at the segment starts as a PNG; returns the path."""
    write_png(path, heatmap(np.asarray(matrix), list(starts), cell))
    return str(path)


def line_plot(series: list[tuple[list[float], list[float]]], width: int = 640, height: int = 320,
              y_range: tuple[float, float] = (0.0, 1.0), margin: int = 12) -> np.ndarray:
    """(height, width, 3) uint8: each (xs, ys) series as a 2-pixel polyline over a white background, in colours
    spread over the colour ramp, inside a grey frame with light grid lines at the quarters of ``y_range``; x spans
    the series' overall range (``train-prune``'s theta trajectories). No text: the JSON beside it has the values."""
    image = np.full((height, width, 3), 255, np.uint8)
    x0, x1 = margin, width - margin - 1
    y0, y1 = margin, height - margin - 1
    for q in (0.25, 0.5, 0.75):
        image[round(y1 - q * (y1 - y0)), x0:x1 + 1] = (225, 225, 225)
    image[y0, x0:x1 + 1] = image[y1, x0:x1 + 1] = (128, 128, 128)
    image[y0:y1 + 1, x0] = image[y0:y1 + 1, x1] = (128, 128, 128)
    all_x = [x for xs, _ in series for x in xs]
    if not all_x:
        return image
    low, high = min(all_x), max(all_x)
    span = (high - low) or 1.0
    ramp = colours(np.linspace(0, 1, max(2, len(series))))
    for k, (xs, ys) in enumerate(series):
        px = x0 + (np.asarray(xs, np.float64) - low) / span * (x1 - x0)
        py = y1 - (np.clip(np.asarray(ys, np.float64), *y_range) - y_range[0]) / (y_range[1] - y_range[0]) * (y1 - y0)
        if len(px) == 1:
            px, py = np.repeat(px, 2), np.repeat(py, 2)
        for a in range(len(px) - 1):  # each segment drawn as dense points
            n = int(max(abs(px[a + 1] - px[a]), abs(py[a + 1] - py[a]))) + 2
            xs_ = np.round(np.linspace(px[a], px[a + 1], n)).astype(int)
            ys_ = np.round(np.linspace(py[a], py[a + 1], n)).astype(int)
            for dy in (0, 1):
                image[np.clip(ys_ + dy, 0, height - 1), np.clip(xs_, 0, width - 1)] = ramp[k]
    return image


def theta_plot(path: str | Path, trace: list[list[float]]) -> str:
    """Write the trajectories of ``trace`` (rows [step, theta_0, theta_1, ...]) as a PNG; returns the path."""
    rows = np.asarray(trace, np.float64)
    series = [(rows[:, 0].tolist(), rows[:, j].tolist()) for j in range(1, rows.shape[1])] if rows.ndim == 2 else []
    write_png(path, line_plot(series))
    return str(path)
