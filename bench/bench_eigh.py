"""Time the d × d eigensolver variants the refined solver could use, and what float32 costs in accuracy.

Issue 19 asks `fit --solver refined` for ≥ 5× the full SVD on the 7B head (d = 3584); the float64
`eigh` of the Gram is ~7 s of its ~30 s (quiet). This measures, on a d × d SPD Gram with a decaying
spectrum (no 7B checkpoint needed, seconds per variant):

  evd64      scipy `eigh(driver="evd")` in float64 (what `symmetric_eigh` runs now)
  evals64    the same, eigenvalues only (tridiagonalisation + dsterf; the kept vectors are still needed)
  evd32      the same on the Gram rounded to float32 (ssyevd)
  cholqr     re-orthonormalising evd32's vectors in float64 (dsyrk + Cholesky + dtrsm), which the
             refined solver's orthonormal output basis would need after evd32

CPU time (`time.process_time`) is reported next to wall time: on a shared machine wall time says
more about the neighbours than about the variant. Then, for evd32 + cholqr (Q, Λ̂), the error
E = G − Q Λ̂ Qᵀ relative to λ_max in the 2-norm and the Frobenius norm (the refined certificate's
η is a probe estimate of a Frobenius norm and must stay below the band-edge gap), and the largest
eigenvalue error against float64.

Usage: OMP_NUM_THREADS=1 python bench/bench_eigh.py [--hidden 3584] [--rows 8000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg as sl


def _timed(name: str, fn: Callable[[], Any]) -> Any:
    """Run fn, print its wall and CPU seconds, return its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    print(f"| {name} | {time.perf_counter() - wall:.2f} | {time.process_time() - cpu:.2f} |", flush=True)
    return result


def _cholqr(v: np.ndarray) -> np.ndarray:
    """V R⁻¹ with Rᵀ R = Vᵀ V: V's columns made orthonormal in float64, each staying close to its own."""
    r = sl.cholesky(sl.blas.dsyrk(1.0, v, trans=1), lower=False, overwrite_a=True, check_finite=False)
    return np.asarray(sl.blas.dtrsm(1.0, r, np.asfortranarray(v), side=1, lower=0))


def main() -> None:
    """Build the Gram, time the variants, print a markdown table and the float32 errors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--rows", type=int, default=8000)
    args = parser.parse_args()
    d = args.hidden
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, d)) * np.arange(1, d + 1) ** -0.5
    gram = w.T @ w
    g32 = gram.astype(np.float32)
    print("| variant | wall s | CPU s |\n|---|---|---|")
    _timed("evd64", lambda: sl.eigh(gram, driver="evd", check_finite=False))
    lam64 = _timed("evals64", lambda: sl.eigh(gram, eigvals_only=True, driver="evd", check_finite=False))
    lam, v = _timed("evd32", lambda: sl.eigh(g32, driver="evd", check_finite=False))
    q = _timed("cholqr", lambda: _cholqr(v.astype(np.float64)))
    lam = lam.astype(np.float64)
    err = gram - (q * lam) @ q.T
    lam_max = float(lam64[-1])
    print(
        f"\nevd32 + cholqr: ‖E‖₂/λmax {np.linalg.norm(err, 2) / lam_max:.2e}, "
        f"‖E‖_F/λmax {np.linalg.norm(err) / lam_max:.2e}, "
        f"max |λ32 − λ64|/λmax {np.abs(lam - lam64).max() / lam_max:.2e}, "
        f"‖QᵀQ − I‖max {np.abs(q.T @ q - np.eye(d)).max():.1e}; "
        f"rounding the Gram to float32: ‖G − fl32(G)‖_F/λmax "
        f"{np.linalg.norm(gram - g32.astype(np.float64)) / lam_max:.2e}"
    )


if __name__ == "__main__":
    main()
