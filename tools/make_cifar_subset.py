"""Write the small CIFAR-10 subsets the repository ships (models/), from the JPEG tarballs.

    python tools/make_cifar_subset.py [--data ../shared/data/cifar10]

- models/cifar10_calib512.npz: 512 training images (a seeded, class-balanced draw) for calibration;
- models/cifar10_test1000.npz: 1,000 test images (100 per class) for quick evaluation.
Each holds x (N, 32, 32, 3) uint8 and y (N,) int64, as every verb's --data reads them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.train import load_split  # noqa: E402


def balanced(y: np.ndarray, per_class: list[int], rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(y == c), n, replace=False) for c, n in enumerate(per_class)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxprune")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x, y = load_split(args.data, "train", args.cache)
    keep = balanced(y, [52] * 2 + [51] * 8, rng)
    np.savez_compressed(ROOT / "models" / "cifar10_calib512.npz", x=x[keep], y=y[keep])
    x, y = load_split(args.data, "test", args.cache)
    keep = balanced(y, [100] * 10, rng)
    np.savez_compressed(ROOT / "models" / "cifar10_test1000.npz", x=x[keep], y=y[keep])
    for name in ("cifar10_calib512.npz", "cifar10_test1000.npz"):
        print(name, f"{(ROOT / 'models' / name).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
