"""Ridge least squares for an affine map between two tensors, from running sums (docs/algorithms.md
section 8).

Rows are positions (a sample's pixels, or its tokens); columns are channels. With ``x`` the tensor of
the pruned model at the cut and ``y`` the original's tensor there, the map is

    y ≈ x W + b,   W = I + A  when x and y have the same width (the residual r = y - x is fitted),
                   W = A      otherwise (r = y),

    A = (Sxx + λ I)^-1 Sxr,   b = mean(r) - mean(x) A,   λ = ridge · trace(Sxx) / d,

where Sxx and Sxr are the centred sums Σ (x - mean x)^T (x - mean x) and Σ (x - mean x)^T (r - mean r).
Fitting the residual makes the ridge term pull the map towards the identity, which is the plain
removal, rather than towards zero. The sums are float64 and d x d, d x e: memory does not grow with
the number of rows. The squared error before (the identity, or zero) and after the fit is read from
the same sums, so a fit reports how much of the cut's error it removes without another pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AffineMap:
    """y ≈ x @ weight + bias, on rows of channels; errors are relative: Σ‖y − ŷ‖² / Σ‖y − mean y‖²."""

    weight: np.ndarray  # (d, e), float32
    bias: np.ndarray  # (e,), float32
    rows: int
    error_before: float  # with no map (y ≈ x, or y ≈ 0 when the widths differ)
    error_after: float


class RidgeSums:
    """Running sums of rows (x, y) for ``solve``; ``add`` takes (rows, d) and (rows, e) arrays."""

    def __init__(self, d: int, e: int) -> None:
        self.identity_prior = d == e
        self.n = 0
        self.sx, self.sr = np.zeros(d), np.zeros(e)
        self.sy = np.zeros(e)
        self.xx, self.xr = np.zeros((d, d)), np.zeros((d, e))
        self.rr, self.yy = 0.0, 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        r = y - x if self.identity_prior else y
        self.n += len(x)
        self.sx += x.sum(0)
        self.sr += r.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xr += x.T @ r
        self.rr += float(np.einsum("ij,ij->", r, r))
        self.yy += float(np.einsum("ij,ij->", y, y))


def solve(sums: RidgeSums, ridge: float = 1e-3) -> AffineMap:
    """The ridge solution of the sums (see the module's docstring)."""
    if sums.n == 0:
        raise ValueError("no rows to fit a map on")
    n = sums.n
    mx, mr = sums.sx / n, sums.sr / n
    sxx = sums.xx - n * np.outer(mx, mx)
    sxr = sums.xr - n * np.outer(mx, mr)
    d = len(mx)
    # A floor of 1e-9 keeps the solve defined where a channel never varies (a dead ReLU): its weight stays 0.
    lam = max(ridge, 1e-9) * max(float(np.trace(sxx)), 1e-30) / d
    a = np.linalg.solve(sxx + lam * np.eye(d), sxr)
    b = mr - mx @ a
    # Σ‖r − x A − b‖² = Σ‖r − mr‖² − 2 tr(Aᵀ Sxr) + tr(Aᵀ Sxx A), all from the sums.
    centred_rr = sums.rr - n * float(mr @ mr)
    after = centred_rr - 2 * float(np.sum(a * sxr)) + float(np.sum(a * (sxx @ a)))
    scale = max(sums.yy - float(sums.sy @ sums.sy) / n, 1e-30)
    weight = a + np.eye(d) if sums.identity_prior else a
    return AffineMap(weight.astype(np.float32), b.astype(np.float32), n, error_before=sums.rr / scale,
                     error_after=max(after, 0.0) / scale)


def channel_rows(tensor: np.ndarray, axis: int) -> np.ndarray:
    """``tensor`` as rows of its ``axis`` (channels): (everything else, channels)."""
    return np.moveaxis(tensor, axis, -1).reshape(-1, tensor.shape[axis])
