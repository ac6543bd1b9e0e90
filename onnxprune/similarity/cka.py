"""Linear CKA (centered kernel alignment; Kornblith et al., ICML 2019), the similarity every
scoring method uses (docs/algorithms.md section 1). float64 throughout; never NaN.

- ``cka``: one-shot, picking the feature form (p small) or the Gram form (p large) by cost.
- ``StreamingCKA``: the feature form accumulated batch by batch; memory independent of n.
- ``unbiased=True``: the unbiased HSIC estimator (Song et al., JMLR 2012), averaged over
  minibatches as in minibatch CKA (Nguyen, Raghu & Kornblith, ICLR 2021). It removes the plain
  estimator's inflation when p >> n, and can go slightly negative.
"""

from __future__ import annotations

import numpy as np


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def _ratio(num: float, den_sq: float) -> float:
    """num / sqrt(den_sq), 0 when the denominator vanishes (a constant representation)."""
    if not np.isfinite(num) or not np.isfinite(den_sq) or den_sq <= 0:
        return 0.0
    return float(num / np.sqrt(den_sq))


def cka_feature(x: np.ndarray, y: np.ndarray) -> float:
    """||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centered."""
    x, y = _flat(x), _flat(y)
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = _unit(x), _unit(y)
    return _ratio(np.linalg.norm(y.T @ x) ** 2, np.linalg.norm(x.T @ x) ** 2 * np.linalg.norm(y.T @ y) ** 2)


def cka_gram(x: np.ndarray, y: np.ndarray) -> float:
    """<Kc, Lc> / (||Kc|| ||Lc||) with K = X X^T, L = Y Y^T double-centered."""
    k, l_ = _centered_gram(_unit(_flat(x))), _centered_gram(_unit(_flat(y)))
    return _ratio(float((k * l_).sum()), float((k * k).sum() * (l_ * l_).sum()))


def cka(x: np.ndarray, y: np.ndarray, unbiased: bool = False) -> float:
    """Linear CKA of two representations of the same n samples (rows)."""
    x, y = _flat(x), _flat(y)
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same samples: {len(x)} and {len(y)} rows")
    if _constant(x) or _constant(y):
        return 0.0  # CKA is undefined for a representation without variance; call it dissimilar
    if unbiased:
        k, l_ = _gram(_unit(x)), _gram(_unit(y))
        return _ratio(unbiased_hsic(k, l_), unbiased_hsic(k, k) * unbiased_hsic(l_, l_))
    if max(x.shape[1], y.shape[1]) <= len(x):
        return cka_feature(x, y)
    return cka_gram(x, y)


def unbiased_hsic(k: np.ndarray, l_: np.ndarray) -> float:
    """HSIC_1 of Song et al. (2012) for Gram matrices of n >= 4 samples."""
    n = len(k)
    if n < 4:
        raise ValueError("the unbiased HSIC estimator needs at least 4 samples")
    k, l_ = k.copy(), l_.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    kl = k @ l_
    return float((np.trace(kl) + k.sum() * l_.sum() / ((n - 1) * (n - 2)) - 2 * kl.sum() / (n - 2)) / (n * (n - 3)))


def _constant(x: np.ndarray) -> bool:
    return bool(np.linalg.norm(x - x.mean(0)) <= 1e-12 * max(np.linalg.norm(x), 1e-300))


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x)
    return x / norm if norm > 0 else x


def _gram(x: np.ndarray) -> np.ndarray:
    return x @ x.T


def _centered_gram(x: np.ndarray) -> np.ndarray:
    g = _gram(x)
    return g - g.mean(0, keepdims=True) - g.mean(1, keepdims=True) + g.mean()


class StreamingCKA:
    """CKA accumulated over batches of paired representations.

    Biased (default): feature form, keeping X^T X, Y^T Y, X^T Y and the column sums; centered at
    the end with Xc^T Yc = X^T Y - n mean_x mean_y^T. Each representation is scaled by one
    constant fixed on the first batch (CKA is scale invariant; this keeps float64 well away from
    overflow). Unbiased: the minibatch estimator, sum of HSIC_1 over batches (each of >= 4 samples).
    """

    def __init__(self, unbiased: bool = False) -> None:
        self.unbiased = unbiased
        self.n = 0
        self._scale: tuple[float, float] | None = None
        self._sums: list[np.ndarray] | None = None  # biased: xx, yy, xy, sx, sy; unbiased: hxy, hxx, hyy

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = _flat(x), _flat(y)
        if len(x) != len(y):
            raise ValueError("paired batches must have the same number of samples")
        if self._scale is None:
            self._scale = tuple(1.0 / max(np.linalg.norm(a) / np.sqrt(len(a)), 1e-300) for a in (x, y))
        x, y = x * self._scale[0], y * self._scale[1]
        self.n += len(x)
        if self.unbiased:
            k, l_ = _gram(x), _gram(y)
            parts = [np.array(unbiased_hsic(k, l_)), np.array(unbiased_hsic(k, k)), np.array(unbiased_hsic(l_, l_))]
        else:
            parts = [x.T @ x, y.T @ y, y.T @ x, x.sum(0), y.sum(0)]
        self._sums = parts if self._sums is None else [a + b for a, b in zip(self._sums, parts)]

    def value(self) -> float:
        if self._sums is None:
            raise ValueError("no batch was added")
        if self.unbiased:
            hxy, hxx, hyy = (float(v) for v in self._sums)
            return _ratio(hxy, hxx * hyy)
        xx, yy, yx, sx, sy = self._sums
        mx, my = sx / self.n, sy / self.n
        xx_c = xx - self.n * np.outer(mx, mx)
        yy_c = yy - self.n * np.outer(my, my)
        yx_c = yx - self.n * np.outer(my, mx)
        return _ratio(np.linalg.norm(yx_c) ** 2, np.linalg.norm(xx_c) ** 2 * np.linalg.norm(yy_c) ** 2)


class StoredCKA:
    """Keeps the (float32) representations and computes ``cka`` at the end: for wide features
    (p in the thousands), where three p x p accumulators would cost more than n x p rows."""

    def __init__(self, unbiased: bool = False) -> None:
        self.unbiased = unbiased
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        self._x.append(np.asarray(x, np.float32).reshape(len(x), -1))
        self._y.append(np.asarray(y, np.float32).reshape(len(y), -1))

    def value(self) -> float:
        return cka(np.concatenate(self._x), np.concatenate(self._y), unbiased=self.unbiased)


def accumulator(width: int, unbiased: bool = False) -> StreamingCKA | StoredCKA:
    """A streaming accumulator for features up to 512 wide (memory independent of n), else stored rows."""
    return StreamingCKA(unbiased) if width <= 512 and not unbiased else StoredCKA(unbiased)
