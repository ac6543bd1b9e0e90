"""models/train.py's augmentation: each image is a flipped or unflipped 32x32 crop of its zero-padded self, and
Cutout blanks one border-clipped square, the same in every channel, and nothing else."""

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models import train  # noqa: E402


def test_augment_returns_a_crop_of_the_padded_image_flipped_or_not():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=gen)
    out = train.augment(images, gen)
    padded = torch.nn.functional.pad(images, (0, 0, 4, 4, 4, 4))
    for image, crop in zip(padded, out):
        candidates = [image[r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(crop, x) or torch.equal(crop, x.flip(1)) for x in candidates)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 32), seed=st.integers(0, 2**31 - 1))
def test_cutout_blanks_one_clipped_square_in_every_channel(size, seed):
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last) + 10.0  # no zeros of its own
    out = train.cutout(x, size, torch.Generator().manual_seed(seed))
    assert out.is_contiguous(memory_format=torch.channels_last)
    blank = out == 0
    assert torch.equal(blank, blank[:, :1].expand_as(blank))  # the same pixels in every channel
    assert torch.equal(out[~blank], x[~blank])
    for hole in blank[:, 0]:
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert hole.sum() == len(rows) * len(cols)  # a rectangle: every (row, col) pair is blank
        for idx in (rows, cols):  # contiguous, at most size long, clipped only where it meets a border
            assert len(idx) <= size and torch.equal(idx, torch.arange(idx[0], idx[0] + len(idx)))
            assert len(idx) == size or idx[0] == 0 or idx[-1] == 31
