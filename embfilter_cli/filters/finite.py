"""Filtering and normalising rows without silent overflow, for every path that writes vectors.

Finite inputs near float32's limit (|x| ≈ 3e38) overflow a float32 product P·x or a squared norm
Σ y², and the overflow turned into Inf, NaN or all-zero "unit" vectors with exit status 0. Two
rules, shared by `apply` (arrays and tables), `embed` and the Spark/Ray batches:

- `project_rows`: P·x − m in the input's precision; rows whose result is not finite although
  their input was are redone in float64, whose range holds any product of float32 values;
- `unit_rows`: each row is divided by its largest |value| before its length is taken, so the
  squared norm lies in [1, k] and cannot overflow or underflow; all-zero rows stay zero.

What still does not fit the output dtype (a float64 result beyond float32's range without
`--normalize`) is the caller's to refuse: see `vectors.stream` and `vectors.arrow_batches`.
"""

from __future__ import annotations

import numpy as np

from embfilter_cli.filters.centering import apply_affine


def project_rows(x: np.ndarray, projection: np.ndarray, mean: np.ndarray | None, finite: np.ndarray) -> np.ndarray:
    """P·x − m for the rows of `x` (as `apply_affine`), in float64 where float32 would overflow.

    Args:
        finite: which rows of `x` are finite (their results must be finite too).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        y = apply_affine(x, projection, mean)
    if y.dtype == np.float64:
        return y
    with np.errstate(over="ignore", invalid="ignore"):
        overflowed = ~np.isfinite(y.sum(axis=1)) & finite
    if overflowed.any():
        rows = np.flatnonzero(overflowed)
        y = y.astype(np.float64)
        y[rows] = apply_affine(np.asarray(x[rows], dtype=np.float64), projection, mean)
    return y


def unit_rows(y: np.ndarray) -> np.ndarray:
    """Each row of `y` scaled to unit length (same dtype); all-zero rows stay zero, NaN rows stay NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.max(np.abs(y), axis=1) if y.shape[1] else np.zeros(len(y), y.dtype)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1).astype(y.dtype)
        z = y / scale[:, None]
        norms = np.sqrt(np.einsum("ij,ij->i", z, z))
    norms[norms == 0] = 1  # an all-zero result has no direction; keep it zero rather than NaN
    return z / norms[:, None]
