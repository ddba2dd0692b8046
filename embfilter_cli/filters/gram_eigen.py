"""What the refined solver needs from the float32 Gram's eigendecomposition, without all of it.

The refined solver (`filters/refine.py`) takes three things from G̃ (d×d, float64), indexed by
descending eigenvalue:
  values       all d eigenvalues: σ for the band rule and the artifact, and Weyl's bound in the
               certificate;
  vectors(J)   the eigenvectors of the removed and guard directions J: the starting basis;
  correction   t = −Σ_{k∉J} v_k (v_kᵀ r) / (λ_k − θ) for each removed Ritz pair (θ, residual r).
A full `eigh` (LAPACK dsyevd) computes all d eigenvectors for that: 5.6 s of a ~27 s 7B fit
(152064 × 3584, 2 cores). `Tridiagonal` reduces G̃ once to T = Qᵀ G̃ Q (dsytrd, 2.1 s there) and
gets all three from T and the stored Householder reflectors of Q:
  values       dsterf on T, O(d²);
  vectors(J)   T's eigenvectors for J by bisection and inverse iteration (dstebz + dstein, O(d·|J|)),
               mapped back by Q (dormqr, O(d²·|J|));
  correction   Q (T − θI)⁻¹ Qᵀ r with r and the solution projected off T's J eigenvectors: one
               tridiagonal solve per θ (dgtsv, O(d)) and two applications of Q.
`FullEigh` gives the same from a complete eigendecomposition (`symmetric_eigh`), on CUDA, where
cuSOLVER runs it on the device.

For `lower=True`, LAPACK's dsytrd stores Q = H(1)···H(d−1), H(i) = I − τ_i v_i v_iᵀ with v_i(i+1) = 1
and v_i(i+2:d) in column i below the subdiagonal. That is a QR factorisation's storage for the
trailing (d−1)×(d−1) block, so Q·C = [C(1,:); dormqr(that block, C(2:d,:))], as LAPACK's own
dormtr does (scipy wraps dormqr, not dormtr).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from embfilter_cli.errors import EmbfilterError
from embfilter_cli.filters.spectral import symmetric_eigh


class GramEigen(Protocol):
    """The eigen-information of a symmetric matrix the refined solver uses (module docstring)."""

    values: np.ndarray  # float64 (d,), descending

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Orthonormal eigenvectors (d, len(idx)) for the descending indices `idx`."""

    def correction(self, resid: np.ndarray, theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """−Σ_{k∉idx} v_k (v_kᵀ r_j) / (λ_k − θ_j) for each column r_j of `resid` (d, m)."""


def gram_eigen(gram: np.ndarray, device: torch.device) -> GramEigen:
    """The tridiagonal route on the CPU, a full eigendecomposition on an accelerator (or when d < 3)."""
    if device.type == "cpu" and gram.shape[0] >= 3:
        return Tridiagonal(gram)
    return FullEigh(gram, device)


class FullEigh:
    """All eigenvectors, from `symmetric_eigh` (dsyevd, or cuSOLVER on CUDA)."""

    def __init__(self, gram: np.ndarray, device: torch.device) -> None:
        self.values, self._vecs = symmetric_eigh(gram, device)

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Columns `idx` of the full eigenvector matrix."""
        return np.ascontiguousarray(self._vecs[:, idx])

    def correction(self, resid: np.ndarray, theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The sum over every eigenvector outside `idx` (GramEigen.correction)."""
        # All of V with the rows of idx zeroed, rather than a d × |rest| copy of V: peak memory.
        rest = np.setdiff1d(np.arange(len(self.values)), idx)
        coef = self._vecs.T @ resid
        coef[idx] = 0.0
        coef[rest] /= self.values[rest][:, None] - theta[None, :]
        return -(self._vecs @ coef)


class Tridiagonal:
    """G̃ = Q T Qᵀ from one dsytrd; values, selected vectors and the correction from T (module docstring)."""

    def __init__(self, gram: np.ndarray) -> None:
        from scipy.linalg import lapack

        d = gram.shape[0]
        self._d = d
        lwork = int(lapack.dsytrd_lwork(d, lower=1)[0])  # the blocked path: the default lwork is unblocked
        packed, diag, off, tau, info = lapack.dsytrd(gram, lower=1, lwork=max(lwork, 1))
        if info != 0:
            raise EmbfilterError(f"LAPACK dsytrd failed (info {info}) on the {d}×{d} Gram")
        self._diag, self._off, self._tau = diag, off, tau
        self._reflectors = _trailing_block(packed)
        asc = lapack.dsterf(diag.copy(), off.copy())[0]
        self.values = asc[::-1].copy()
        self._tvectors: dict[bytes, np.ndarray] = {}

    def _t_vectors(self, idx: np.ndarray) -> np.ndarray:
        """T's eigenvectors for the descending indices `idx` (d, len(idx)), computed once per index set."""
        key = np.asarray(idx, np.int64).tobytes()
        if key not in self._tvectors:
            from scipy.linalg import eigh_tridiagonal

            d = self._d
            asc = d - 1 - np.asarray(idx, np.int64)
            out = np.empty((d, len(asc)))
            for lo, hi in _runs(np.sort(asc)):
                _, z = eigh_tridiagonal(self._diag, self._off, select="i", select_range=(lo, hi))
                for j, a in enumerate(asc):
                    if lo <= a <= hi:
                        out[:, j] = z[:, a - lo]
            # Inverse iteration orthogonalises within clusters; one QR makes the set orthonormal to
            # float64 accuracy, which Rayleigh–Ritz assumes.
            q, r = np.linalg.qr(out)
            self._tvectors[key] = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))
        return self._tvectors[key]

    def _apply_q(self, block: np.ndarray, trans: str) -> np.ndarray:
        """Q·block (trans "N") or Qᵀ·block (trans "T") for a (d, m) block."""
        from scipy.linalg import lapack

        out = np.array(block, dtype=np.float64, order="F", copy=True)
        if self._d < 2 or out.shape[1] == 0:
            return out
        lwork = out.shape[1] * 64 + 65 * 64
        res = lapack.dormqr("L", trans, self._reflectors, self._tau, np.asfortranarray(out[1:]), lwork=lwork)
        if res[-1] != 0:
            raise EmbfilterError(f"LAPACK dormqr failed (info {res[-1]})")
        out[1:] = res[0]
        return out

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Q times T's eigenvectors for `idx`: G̃'s eigenvectors, orthonormal to float64 accuracy."""
        return self._apply_q(self._t_vectors(idx), "N")

    def correction(self, resid: np.ndarray, theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """−Q (T − θ_j I)⁻¹ Qᵀ r_j on the complement of T's `idx` eigenvectors (GramEigen.correction)."""
        from scipy.linalg import lapack

        z = self._t_vectors(idx)
        s = self._apply_q(resid, "T")
        s -= z @ (z.T @ s)
        y = np.empty_like(s)
        scale = max(float(np.max(np.abs(self.values))), np.finfo(np.float64).tiny)
        for j, shift in enumerate(np.asarray(theta, np.float64)):
            for nudge in (0.0, 1e-13, -1e-13):  # an exactly singular T − θI: move θ off the eigenvalue
                _, _, _, x, info = lapack.dgtsv(
                    self._off, self._diag - (shift + nudge * scale), self._off, s[:, j : j + 1]
                )
                if info == 0:
                    break
            else:
                raise EmbfilterError(f"LAPACK dgtsv failed (info {info}) on the shifted tridiagonal")
            y[:, j] = x[:, 0]
        y -= z @ (z.T @ y)
        return -self._apply_q(y, "N")


def _trailing_block(packed: np.ndarray) -> np.ndarray:
    """packed[1:, :d−1] as an F-contiguous array, built in packed's own memory (it is not needed after).

    A plain copy of the 100 MB block costs ~0.3 s at d = 3584 (fresh pages); moving each column
    forward in place costs ~0.01 s. Column j moves from offset j·d + 1 to j·(d − 1): never past
    its own start, so earlier columns are never overwritten before they are read.
    """
    d = packed.shape[0]
    m = d - 1
    if m == 0:
        return np.zeros((0, 0), order="F")
    flat = packed.reshape(-1, order="F")
    if not np.shares_memory(flat, packed):  # not F-contiguous: a copy is the only way
        return np.asfortranarray(packed[1:, :m])
    for j in range(m):
        flat[j * m : (j + 1) * m] = flat[j * d + 1 : j * d + 1 + m]
    return flat[: m * m].reshape((m, m), order="F")


def _runs(sorted_idx: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in a sorted array, as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for i in sorted_idx.tolist():
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
