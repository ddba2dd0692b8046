"""Post-processing fitted on unlabeled background vectors: centering, all-but-the-top, whitening, PCA.

These are the usual data-driven baselines a spectral filter is compared with (`embfilter eval
--background`), and centering is also what makes a filter affine (y = P·x − m, with m the mean of
the FILTERED background). Every function is numpy in, numpy out, in float64:

  - centering:        y = x − μ, μ the background mean.
  - all-but-the-top:  y = (I − U_D U_Dᵀ)(x − μ), U_D the top D principal directions of the
                      centred background (Mu & Viswanath, 2018).
  - whitening to k:   y = Λ_k^{-1/2} U_kᵀ (x − μ), the top k eigenpairs of the background covariance
                      (Su et al., 2021); the background's covariance becomes the k×k identity.
  - PCA to k:         y = U_kᵀ (x − μ).

Covariance uses the unbiased 1/(n − 1) normalisation; cosines do not depend on that scale, but
whitening's "identity covariance" does. A background of n vectors spans at most n − 1 centred
directions, so D or k principal directions need at least D + 1 / k + 1 vectors (and a covariance of
that rank: duplicated texts lower it); the error says how many are needed.

Not handled: weighting background vectors, shrinkage/regularised whitening, streaming (the whole
background is held in memory; it is a few hundred to a few thousand vectors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embfilter_cli.errors import InputDataError

# An eigenvalue below this fraction of the largest counts as zero (the background does not span it).
RANK_TOLERANCE = 1e-10


def _as_matrix(vectors: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float64)
    if array.ndim != 2:
        raise InputDataError(f"{what} must be a 2-D array of vectors (n, d), got shape {array.shape}")
    if array.shape[0] == 0:
        raise InputDataError(f"{what} has no vectors; give at least one non-empty background text")
    if not np.all(np.isfinite(array)):
        raise InputDataError(f"{what} contains NaN or Inf; check the embeddings it was computed from")
    return array


def background_mean(background: np.ndarray) -> np.ndarray:
    """The mean vector (d,) of the background vectors (n, d)."""
    return _as_matrix(background, "the background").mean(axis=0)


@dataclass(frozen=True)
class PrincipalAxes:
    """The background's mean and its covariance eigenpairs, largest first."""

    mean: np.ndarray  # (d,)
    eigenvalues: np.ndarray  # (r,), descending, r = min(n - 1, d) numerically positive ones
    axes: np.ndarray  # (r, d), orthonormal rows
    count: int  # n, the number of background vectors

    def require(self, k: int, what: str) -> None:
        """Raise unless at least k principal directions exist (k + 1 texts, rank k)."""
        if k < 1:
            raise InputDataError(f"{what} needs a positive number of directions, got {k}")
        d = self.mean.shape[0]
        if k > d:
            raise InputDataError(f"{what} asks for {k} directions but the vectors have only {d} dimensions")
        if self.count < k + 1:
            raise InputDataError(
                f"{what} needs at least {k + 1} background texts (n − 1 ≥ {k}), got {self.count}; "
                f"add background texts or ask for at most {max(self.count - 1, 0)} dimensions"
            )
        if self.eigenvalues.shape[0] < k:
            raise InputDataError(
                f"{what} needs a background covariance of rank ≥ {k}, but the {self.count} background vectors "
                f"span only {self.eigenvalues.shape[0]} directions (duplicate texts?); add distinct texts"
            )


def principal_axes(background: np.ndarray) -> PrincipalAxes:
    """Mean and covariance eigendecomposition (float64, eigenvalues descending, zero ones dropped)."""
    x = _as_matrix(background, "the background")
    n, d = x.shape
    mean = x.mean(axis=0)
    centred = x - mean
    if n < 2:
        return PrincipalAxes(mean, np.zeros(0), np.zeros((0, d)), n)
    if n - 1 < d:
        # Fewer vectors than dimensions: decompose the n×n Gram instead of the d×d covariance.
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        values, axes = sv**2 / (n - 1), vt
    else:
        values, vectors = np.linalg.eigh(centred.T @ centred / (n - 1))
        values, axes = values[::-1], vectors[:, ::-1].T
    top = float(values[0]) if values.size else 0.0
    keep = values > RANK_TOLERANCE * top if top > 0 else np.zeros(values.shape, dtype=bool)
    axes = axes[keep]
    # Deterministic signs (largest-magnitude entry positive), as for W_U's singular vectors.
    signs = np.sign(axes[np.arange(axes.shape[0]), np.argmax(np.abs(axes), axis=1)])
    signs[signs == 0] = 1.0
    return PrincipalAxes(mean, values[keep], axes * signs[:, None], n)


def center(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """y = x − μ."""
    x = np.asarray(vectors, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64)
    if mu.shape != (x.shape[-1],):
        raise InputDataError(f"the mean has shape {mu.shape} but the vectors have dimension {x.shape[-1]}")
    return x - mu


def all_but_the_top(vectors: np.ndarray, axes: PrincipalAxes, d_remove: int) -> np.ndarray:
    """Centre on the background mean, then remove the top `d_remove` principal directions."""
    if d_remove == 0:
        return center(vectors, axes.mean)
    axes.require(d_remove, f"all-but-the-top D={d_remove}")
    y = center(vectors, axes.mean)
    u = axes.axes[:d_remove]
    return y - (y @ u.T) @ u


def whiten(vectors: np.ndarray, axes: PrincipalAxes, k: int) -> np.ndarray:
    """Whitening to k dims: Λ_k^{-1/2} U_kᵀ (x − μ); the background maps to identity covariance."""
    axes.require(k, f"whitening to {k} dims")
    return (center(vectors, axes.mean) @ axes.axes[:k].T) / np.sqrt(axes.eigenvalues[:k])


def pca(vectors: np.ndarray, axes: PrincipalAxes, k: int) -> np.ndarray:
    """PCA to k dims: U_kᵀ (x − μ)."""
    axes.require(k, f"PCA to {k} dims")
    return center(vectors, axes.mean) @ axes.axes[:k].T
