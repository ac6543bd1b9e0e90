import struct
import zlib

import numpy as np
import pytest

from onnxprune.report.png import BOUNDARY, SIGNATURE, cka_plot, colours, encode_png, heatmap


def decode(data: bytes) -> np.ndarray:
    """A minimal PNG reader for what encode_png writes: chunks checked by CRC, 8-bit RGB, filter 0."""
    assert data[:8] == SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def test_encode_round_trips():
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode(encode_png(rgb)), rgb)
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4)))


def test_heatmap_cells_colours_and_boundaries(tmp_path):
    m = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    path = cka_plot(tmp_path / "m.cka.png", m, [0, 2], cell=6)
    image = decode(open(path, "rb").read())
    assert image.shape == (18, 18, 3)
    ramp = colours(m)
    assert tuple(image[2, 2]) == tuple(ramp[0, 0]) and tuple(image[2, 8]) == tuple(ramp[0, 1])
    assert tuple(ramp[0, 2]) == (68, 1, 84) and tuple(ramp[0, 0]) == (253, 231, 37)  # low dark blue, high yellow
    assert all(tuple(image[r, 11]) == BOUNDARY for r in range(18))  # the line before column 2, full height
    assert all(tuple(image[12, c]) == BOUNDARY for c in range(18))
    assert tuple(image[0, 5]) != BOUNDARY  # no line at 0
    np.testing.assert_array_equal(heatmap(m, [], cell=1), ramp)
