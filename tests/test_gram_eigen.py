"""The refined solver's eigen-information from a tridiagonal reduction, against numpy's float64 eigh."""

import numpy as np
import pytest
import torch

from embfilter_cli.errors import BandError
from embfilter_cli.filters.band import Band
from embfilter_cli.filters.fitting import projection_from_spectrum
from embfilter_cli.filters.gram_eigen import FullEigh, Tridiagonal, _runs, _trailing_block, gram_eigen
from embfilter_cli.filters.spectral import Spectrum


def _known_symmetric(d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, λ descending, V) with A = V diag(λ) Vᵀ, a decaying spectrum with a cluster of three near-equal values."""
    rng = np.random.default_rng(seed)
    lam = 100.0 * np.arange(1, d + 1, dtype=np.float64) ** -0.7
    lam[10:13] = lam[10] * (1 + np.array([0.0, -1e-9, -2e-9]))  # a tight cluster inside J below
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (v * lam) @ v.T, lam, v


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


def test_values_and_selected_vectors_match_numpy():
    d = 120
    a, lam, v = _known_symmetric(d)
    tri = Tridiagonal(a.copy(order="F"))
    np.testing.assert_allclose(tri.values, lam, rtol=0, atol=1e-12 * lam[0])
    idx = np.r_[np.arange(0, 20), np.arange(d - 6, d)]
    vecs = tri.vectors(idx)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(len(idx)), atol=1e-13)
    # Residuals ‖A v − λ v‖ at float64 level, and each isolated vector equal to numpy's up to sign.
    resid = np.linalg.norm(a @ vecs - vecs * lam[idx], axis=0).max() / lam[0]
    assert resid < 1e-13
    for j in (0, 5, 19, len(idx) - 1):
        assert abs(abs(float(vecs[:, j] @ v[:, idx[j]])) - 1.0) < 1e-10
    # The cluster is determined only as a subspace: compare spans.
    assert _gap(vecs[:, 10:13], v[:, 10:13]) < 1e-6


def test_correction_equals_the_eigenvector_sum():
    """−Σ_{k∉J} v_k (v_kᵀ r) / (λ_k − θ), from T and Q, equals the sum over numpy's eigenvectors."""
    d = 90
    a, lam, v = _known_symmetric(d, seed=1)
    idx = np.r_[np.arange(0, 14), np.arange(d - 4, d)]
    rng = np.random.default_rng(2)
    resid = rng.standard_normal((d, 5))
    theta = lam[[0, 3, 13, d - 2, d - 1]] * (1 + 1e-7)  # Ritz values near removed eigenvalues
    rest = np.setdiff1d(np.arange(d), idx)
    want = -(v[:, rest] @ ((v[:, rest].T @ resid) / (lam[rest][:, None] - theta[None, :])))
    for eig in (Tridiagonal(a.copy(order="F")), FullEigh(a, torch.device("cpu"))):
        got = eig.correction(resid, theta, idx)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_gram_eigen_picks_the_tridiagonal_route_on_the_cpu():
    a, lam, _ = _known_symmetric(16)
    eig = gram_eigen(a, torch.device("cpu"))
    assert isinstance(eig, Tridiagonal)
    np.testing.assert_allclose(eig.values, lam, atol=1e-12 * lam[0])


def test_trailing_block_is_moved_in_place_and_equals_a_copy():
    packed = np.asfortranarray(np.arange(49.0).reshape(7, 7))
    want = np.asfortranarray(packed[1:, :6])
    got = _trailing_block(packed)
    assert got.flags.f_contiguous and np.shares_memory(got, packed)
    np.testing.assert_array_equal(got, want)
    c_order = np.arange(49.0).reshape(7, 7)  # not F-contiguous: copied instead
    np.testing.assert_array_equal(_trailing_block(c_order), c_order[1:, :6])


def test_runs_of_consecutive_indices():
    assert _runs(np.array([0, 1, 2, 7, 8, 10])) == [(0, 2), (7, 8), (10, 10)]
    assert _runs(np.array([], dtype=np.int64)) == []


def test_partial_spectrum_refuses_a_band_it_did_not_compute():
    d = 8
    v, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    spec = Spectrum(np.linspace(8, 1, d), v[:, [0, 1, 7]], "refined", indices=np.array([0, 1, 7]))
    proj = projection_from_spectrum(spec, Band(d, 2, 5))
    assert _gap(proj.matrix.T, v[:, 2:7]) < 1e-12 and proj.kept_indices.size == 0
    with pytest.raises(BandError, match="only the directions it removed"):
        projection_from_spectrum(spec, Band(d, 3, 4))


@pytest.mark.parametrize("r", [0, 1, 5, 12])
def test_orthonormal_complement_against_numpy_qr(r):
    from embfilter_cli.filters.fitting import orthonormal_complement

    d = 12
    u, _ = np.linalg.qr(np.random.default_rng(r).standard_normal((d, r)))
    rows = orthonormal_complement(u)
    assert rows.shape == (d - r, d)
    np.testing.assert_allclose(rows @ rows.T, np.eye(d - r), atol=1e-14)
    assert np.allclose(rows @ u, 0.0, atol=1e-14)
    q, _ = np.linalg.qr(u, mode="complete")  # numpy's complete Householder Q: the same rows
    np.testing.assert_allclose(rows, q[:, r:].T, atol=1e-13)


@pytest.mark.parametrize(("d", "top", "bottom"), [(1, 0, 0), (2, 1, 0), (2, 0, 1), (3, 1, 1), (5, 2, 2), (4, 0, 0)])
def test_refined_solver_on_tiny_hidden_sizes(d, top, bottom):
    """d < 3 takes the full eigendecomposition; every size gives a certified filter of the right shape."""
    from embfilter_cli.filters.refine import refined_spectrum

    w = np.random.default_rng(0).standard_normal((50, d)) * np.linspace(3, 1, d)
    band = Band(d, top, d - top - bottom)
    spec, chosen = refined_spectrum(torch.from_numpy(w), lambda s: band)
    assert chosen == band and spec.certificate["passed"] and spec.vectors.shape == (d, top + bottom)
    np.testing.assert_allclose(spec.singular_values, np.linalg.svd(w, compute_uv=False), rtol=1e-6)
    proj = projection_from_spectrum(spec, band)
    assert proj.matrix.shape == (d - top - bottom, d)
    np.testing.assert_allclose(proj.matrix @ proj.matrix.T, np.eye(d - top - bottom), atol=1e-12)
