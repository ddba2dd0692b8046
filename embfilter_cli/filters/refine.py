"""The `refined` solver: a float32 Gram, then the REMOVED directions refined and certified in float64.

1. G̃ = W_Uᵀ W_U from per-chunk float32 Grams summed in float64 (`gram_matrix(precision="float32")`,
   about twice as fast as the float64 Gram on CPUs). Its eigenvalues λ̃ (all d, float64) and the
   eigenvectors Ṽ_J of the directions refined below come from one tridiagonal reduction on the
   CPU (`filters/gram_eigen.py`: 2.1 s against a full eigh's 5.6 s at d = 3584), from a full eigh
   on CUDA.
2. The band is chosen from λ̃ (a named band, or `--band auto` through `pick_band`).
3. The removed directions (top R, bottom B) and a guard band of neighbours at each edge (the index
   set J) are refined against W_U itself: pass 1 computes G·[Ṽ_J, probes] in float64, W_U upcast
   chunk by chunk (never whole); Rayleigh–Ritz on span Ṽ_J; each removed Ritz pair (θ, u) with
   residual r = G u − θ u gets a correction t = −Σ_{k∉J} ṽ_k (ṽ_kᵀ r) / (λ̃_k − θ) (G̃'s own
   eigendecomposition as the preconditioner, applied through the tridiagonal form; its error is
   second order in ‖G̃ − G‖ / gap).
   Rayleigh–Ritz runs on the grown basis [Ṽ_J, T] with G·T first taken as G̃·T (no pass): the
   residuals are then off by at most ‖G̃ − G‖₂ ‖s_T‖₂ ≤ η ‖s_T‖₂ (s_T: the Ritz vectors'
   coefficients on T, as small as the correction), which the certificate adds. Only when that does
   not certify does a second pass compute G·T exactly (at most `max_passes` passes in all).
4. Certificate, float64: the residuals of the removed Ritz vectors (from the passes' own products,
   exact up to float64 rounding, plus the bound above); η, an estimate of ‖G̃ − G‖_F from Gaussian probes x
   (E‖(G̃ − G)x‖² = ‖G̃ − G‖_F², Hutchinson), doubled for safety; the gap δ between the removed
   Ritz values and the kept eigenvalues of G, which lie within ‖G̃ − G‖₂ ≤ η of λ̃ (Weyl); and the
   Davis–Kahan sin θ bound ‖sin Θ‖₂ ≤ ‖R‖₂ / δ on the removed subspace. It passes when the bound is
   at most `tol`, every removed Ritz value lies within η of its float32 eigenvalue (else η was
   underestimated) and the band chosen from the refined values is the one refined. The caller
   (`filters/solve.py`) falls back to the exact float64 solver when it fails.
5. The spectrum returned is partial: all d values (the removed ones refined, the kept ones
   float32-Gram accurate) and the vectors of the removed directions only (`Spectrum.indices`).
   The filter needs only the kept span, the complement of the removed subspace, which
   `projection_from_spectrum` builds by QR; its rows are therefore not singular vectors
   (`kept_indices` empty, as for the randomized solver), and dot products and cosines are those
   of the exact filter. Computing every kept eigenvector is what the tridiagonal route saves.

Not handled: the guarantee is probabilistic in one place (η, used for the gap and for the estimated
residual part, comes from random probes; a bad draw
makes the bound optimistic by the ratio of the estimate to the true ‖G̃ − G‖₂, which ‖·‖_F already
over-covers by about √d/2 for unstructured rounding errors). CUDA runs the same code on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from embfilter_cli.errors import EmbfilterError
from embfilter_cli.filters.band import Band
from embfilter_cli.filters.gram_eigen import gram_eigen
from embfilter_cli.filters.spectral import (
    DEFAULT_CHUNK_ROWS,
    ProgressFn,
    Spectrum,
    _scaled_gram,
    canonical_signs,
)

CERTIFICATE_VERSION = 1
DEFAULT_TOL = 1e-6  # bound on the sine of the largest principal angle of the removed subspace (issue 19)
DEFAULT_GUARD = 16  # neighbours refined with each edge of the band
DEFAULT_PROBES = 8  # Gaussian probes that estimate the float32 Gram's error
DEFAULT_MAX_PASSES = 3
ETA_SAFETY = 2.0  # the probes' estimate of ‖G̃ − G‖_F, doubled

PickBand = Callable[[np.ndarray], Band]  # singular values (descending) → band


def gram_times(
    matrix: torch.Tensor, block: np.ndarray, device: torch.device, chunk_rows: int, scale: float = 1.0
) -> np.ndarray:
    """G·block with G = (W/scale)ᵀ (W/scale), in float64, W upcast chunk by chunk (never whole).

    On the CPU the products go through numpy (OpenBLAS): torch's CPU float64 GEMM (MKL) measured
    half as fast on this project's AMD machine.
    """
    rows, d = matrix.shape
    # One reused float64 buffer: a fresh chunk-sized allocation per step costs page faults.
    buffer = torch.empty((min(chunk_rows, rows), d), dtype=torch.float64, device=device)
    out = np.zeros(block.shape)
    y = torch.from_numpy(np.ascontiguousarray(block)).to(device)
    acc = torch.zeros_like(y) if device.type != "cpu" else None
    for row0 in range(0, rows, chunk_rows):
        source = matrix[row0 : row0 + chunk_rows]
        chunk = buffer[: source.shape[0]]
        chunk.copy_(source)
        if scale != 1.0:
            chunk /= scale
        if acc is None:
            c = chunk.numpy()
            out += c.T @ (c @ block)
        else:
            acc.addmm_(chunk.T, chunk @ y)
    return out if acc is None else acc.cpu().numpy()


def _edge_indices(band: Band, guard: int) -> tuple[np.ndarray, int, int]:
    """J: the removed indices plus up to `guard` kept neighbours at each edge; (J, top guard, bottom guard)."""
    d, room = band.hidden_size, band.keep
    g_top = min(guard, room // 2) if band.top else 0
    g_bot = min(guard, room - g_top - 1) if band.bottom else 0
    top = np.arange(0, band.top + g_top)
    bottom = np.arange(d - band.bottom - g_bot, d) if band.bottom else np.zeros(0, np.int64)
    return np.concatenate([top, bottom]).astype(np.int64), g_top, max(g_bot, 0)


def _ritz(basis: np.ndarray, product: np.ndarray, exact: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rayleigh–Ritz on span(basis) given product ≈ G·basis, exact in its first `exact` columns.

    Returns (θ descending, Ritz vectors, residuals product·s − u θ, coefficients s). The cross block
    Bᵀ G B between exact and estimated columns is taken from the exact side (G is symmetric).
    """
    h = basis.T @ product
    if exact < basis.shape[1]:
        cross = basis[:, exact:].T @ product[:, :exact]
        h[exact:, :exact], h[:exact, exact:] = cross, cross.T
    theta, s = np.linalg.eigh((h + h.T) / 2)
    theta, s = theta[::-1], s[:, ::-1]
    vectors = basis @ s
    return theta, vectors, product @ s - vectors * theta, s


def _new_directions(corr: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """An orthonormal basis of what the corrections add to span(basis), dropping what they do not.

    Each correction is normalised first (a small one matters as much as a big one), then projected
    off the basis (twice: Kahan–Parlett); directions left with less than 1e-6 of their length are
    already in the span (or duplicate another) and are dropped, so the grown basis stays orthonormal
    to float64 accuracy even when there are more corrections than directions outside the basis.
    """
    norms = np.linalg.norm(corr, axis=0)
    corr = corr[:, norms > 0] / norms[norms > 0]
    for _ in range(2):
        corr -= basis @ (basis.T @ corr)
    u, s, _ = np.linalg.svd(corr, full_matrices=False)
    u = u[:, s > 1e-6]
    u -= basis @ (basis.T @ u)
    q, _ = np.linalg.qr(u)
    return q


def refined_spectrum(
    matrix: torch.Tensor,
    pick_band: PickBand,
    *,
    device: torch.device | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    guard: int = DEFAULT_GUARD,
    probes: int = DEFAULT_PROBES,
    tol: float = DEFAULT_TOL,
    max_passes: int = DEFAULT_MAX_PASSES,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[Spectrum, Band]:
    """All d singular values of `matrix` and the removed directions' vectors, certified (module docstring).

    Returns the spectrum and the band `pick_band` chose. A failed certificate is not an error here:
    `spectrum.certificate["passed"]` is False with a `reason`, and the caller decides what to do.
    """
    device = device or torch.device("cpu")
    start = time.perf_counter()
    with torch.autocast(device_type=device.type, enabled=False):
        gram, fro_sq, scale = _scaled_gram(matrix, device, chunk_rows, progress, "float32")
    eig = gram_eigen(gram, device)
    lam = eig.values
    d = len(lam)
    band = pick_band(np.sqrt(np.clip(lam, 0.0, None)) * scale)
    idx, g_top, g_bot = _edge_indices(band, guard)
    top, bottom = band.top, band.bottom

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, probes, generator=gen, dtype=torch.float64).numpy()
    basis = eig.vectors(idx)
    first = gram_times(matrix, np.hstack([basis, x]), device, chunk_rows, scale)
    product = first[:, : len(idx)]
    # Hutchinson: mean ‖(G̃ − G)x‖² over Gaussian x estimates ‖G̃ − G‖_F².
    eta_f = float(np.sqrt(np.mean(np.sum((gram @ x - first[:, len(idx) :]) ** 2, axis=0)))) if probes else 0.0
    eta = ETA_SAFETY * eta_f
    passes, exact = 1, basis.shape[1]
    history: list[float] = []
    while True:
        theta, ritz, resid, coef_s = _ritz(basis, product, exact)
        # Ritz values descend: the top R first, the bottom B last, whatever the basis has grown to.
        removed_cols = np.r_[np.arange(top), np.arange(len(theta) - bottom, len(theta))].astype(np.int64)
        # Estimated products G̃ t = G t + (G̃ − G) t: the residuals are off by at most ‖G̃ − G‖₂ ‖s_T‖₂ ≤ η ‖s_T‖₂.
        unverified = eta * float(np.linalg.norm(coef_s[exact:, removed_cols], 2)) if exact < len(theta) else 0.0
        certificate = _certify(theta, resid, removed_cols, lam, band, eta, tol, unverified)
        history.append(certificate["sin_theta_bound"])
        if certificate["passed"] or len(removed_cols) == 0:
            break
        if exact < basis.shape[1]:
            if passes >= max_passes:
                break
            # The estimate did not certify: one pass makes the correction columns' products exact.
            product[:, exact:] = gram_times(matrix, basis[:, exact:], device, chunk_rows, scale)
            passes, exact = passes + 1, basis.shape[1]
            continue
        if len(idx) == d:
            break
        # Correction t = −Σ_{k∉J} ṽ_k (ṽ_kᵀ r) / (λ̃_k − θ) for each removed Ritz pair; its product
        # is first taken from G̃ (no pass over W_U): often certified as it is, the correction being small.
        corr = _new_directions(eig.correction(resid[:, removed_cols], theta[removed_cols], idx), basis)
        if corr.shape[1] == 0:
            break
        basis = np.hstack([basis, corr])
        product = np.hstack([product, gram @ corr])

    del gram, product, eig  # peak memory: the d×d float32 Gram and its reduction are not needed any more
    removed = ritz[:, removed_cols]
    values = lam.copy()
    removed_idx = np.asarray(band.removed_indices(), dtype=np.int64)
    values[removed_idx] = theta[removed_cols]
    sigma = np.sqrt(np.clip(values, 0.0, None)) * scale
    if certificate["passed"]:
        try:
            again = pick_band(sigma)
        except EmbfilterError as exc:  # the band rule refused the refined values
            again = None
            certificate["reason"] = f"the band rule refused the refined values: {exc}"
        if again != band:
            certificate["passed"] = False
            certificate.setdefault("reason", f"the refined values choose a different band ({again})")
    certificate.update(
        version=CERTIFICATE_VERSION,
        gram_error_estimate=eta_f * scale * scale,
        passes=passes,
        bound_history=[float(f"{h:.3e}") for h in history],
    )
    return (
        Spectrum(
            singular_values=sigma,
            vectors=canonical_signs(removed),
            solver="refined",
            params={
                "method": "gram-float32+tridiagonal-float64+rayleigh-ritz-float64",
                "guard": [int(g_top), int(g_bot)],
                "probes": probes,
                "tol": tol,
                "max_passes": max_passes,
                "chunk_rows": chunk_rows,
                "device": str(device),
                "seed": seed,
            },
            certificate=certificate,
            frobenius_sq=fro_sq * scale * scale,
            seconds=time.perf_counter() - start,
            indices=removed_idx,
        ),
        band,
    )


def _certify(
    theta: np.ndarray,
    resid: np.ndarray,
    removed_cols: np.ndarray,
    lam: np.ndarray,
    band: Band,
    eta: float,
    tol: float,
    unverified: float = 0.0,
) -> dict[str, Any]:
    """The Davis–Kahan certificate of the removed Ritz vectors (module docstring, step 4); scaled units."""
    d, top, bottom = band.hidden_size, band.top, band.bottom
    lam_max = max(float(lam[0]), float(theta[0]) if len(theta) else 0.0, np.finfo(np.float64).tiny)
    if len(removed_cols) == 0:
        return {"passed": True, "sin_theta_bound": 0.0, "max_relative_residual": 0.0, "tol": tol}
    r = resid[:, removed_cols]
    norms = np.linalg.norm(r, axis=0)
    spectral = float(np.linalg.norm(r, 2)) + unverified
    gaps = []
    if top:
        gaps.append(float(theta[top - 1]) - (float(lam[top]) + eta))
    if bottom:
        gaps.append((float(lam[d - bottom - 1]) - eta) - float(theta[len(theta) - bottom]))
    gap = min(gaps)
    bound = spectral / gap if gap > 0 else math.inf
    removed_idx = np.asarray(band.removed_indices(), dtype=np.int64)
    drift = float(np.max(np.abs(theta[removed_cols] - lam[removed_idx])))
    cert: dict[str, Any] = {
        "sin_theta_bound": bound,
        "max_relative_residual": float(norms.max() / lam_max),
        "relative_gap": gap / lam_max,
        "max_value_drift": drift / lam_max,
        "estimated_residual_part": unverified / lam_max,
        "tol": tol,
    }
    finite = math.isfinite(bound) and bool(np.isfinite(r).all())
    if not finite or gap <= 0:
        cert["reason"] = "the removed and kept eigenvalues are not separated beyond the float32 Gram's error"
    elif drift > eta:
        cert["reason"] = "a refined value moved further than the float32 Gram's estimated error"
    elif bound > tol:
        cert["reason"] = f"the sin θ bound {bound:.2e} is above {tol:g}"
    cert["passed"] = "reason" not in cert
    return cert
