"""Background post-processing (centering, all-but-the-top, whitening, PCA) against float64 numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from embfilter_cli.errors import InputDataError
from embfilter_cli.filters.postprocess import (
    all_but_the_top,
    background_mean,
    center,
    pca,
    principal_axes,
    whiten,
)


def _background(n: int = 40, d: int = 12, seed: int = 0) -> np.ndarray:
    """Anisotropic vectors with a common offset, like pooled LLM states."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(8.0, 0.5, d)
    x = rng.standard_normal((n, d)) * scales @ np.linalg.qr(rng.standard_normal((d, d)))[0] + 3.0
    assert x.shape == (n, d)
    return x


def _reference_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, eigenvalues and eigenvectors of the unbiased covariance via SVD of the centred data."""
    mu = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu, s**2 / (len(x) - 1), vt


def test_mean_and_centering_match_numpy():
    x = _background()
    mu = background_mean(x)
    np.testing.assert_allclose(mu, np.mean(x, axis=0), rtol=0, atol=1e-12)
    y = center(x[:3], mu)
    np.testing.assert_allclose(y, x[:3] - x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(center(x, mu).mean(axis=0), 0, atol=1e-12)  # the background itself ends at 0


@pytest.mark.parametrize("n", [40, 8])  # d×d covariance path and the n < d Gram path
def test_principal_axes_match_the_svd_of_the_centred_data(n):
    x = _background(n=n)
    axes = principal_axes(x)
    _mu, values, vt = _reference_axes(x)
    r = min(n - 1, x.shape[1])
    assert axes.eigenvalues.shape == (r,) and axes.axes.shape == (r, x.shape[1]) and axes.count == n
    np.testing.assert_allclose(axes.eigenvalues, values[:r], rtol=1e-10)
    # Same directions up to sign; our signs put each row's largest-magnitude entry positive.
    np.testing.assert_allclose(np.abs(np.sum(axes.axes * vt[:r], axis=1)), 1.0, atol=1e-9)
    rows = np.arange(r)
    assert np.all(axes.axes[rows, np.argmax(np.abs(axes.axes), axis=1)] > 0)


def test_whitening_gives_identity_covariance_on_the_background():
    x = _background()
    axes = principal_axes(x)
    for k in (1, 5, 12):
        y = whiten(x, axes, k)
        assert y.shape == (len(x), k)
        np.testing.assert_allclose(np.cov(y, rowvar=False, ddof=1).reshape(k, k), np.eye(k), atol=1e-9)
        np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-9)


def test_whitening_matches_the_textbook_formula():
    x = _background()
    mu, values, vt = _reference_axes(x)
    query = x[:5] * 0.7 + 1.0
    want = (query - mu) @ vt[:4].T / np.sqrt(values[:4])
    got = whiten(query, principal_axes(x), 4)
    np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-9)  # eigenvector signs may differ


@pytest.mark.parametrize("d_remove", [1, 2, 4])
def test_all_but_the_top_removes_exactly_d_components(d_remove):
    x = _background()
    axes = principal_axes(x)
    y = all_but_the_top(x, axes, d_remove)
    mu, _, vt = _reference_axes(x)
    # Nothing left along the top D principal directions, everything else untouched.
    np.testing.assert_allclose(y @ vt[:d_remove].T, 0, atol=1e-9)
    np.testing.assert_allclose(y @ vt[d_remove:].T, (x - mu) @ vt[d_remove:].T, atol=1e-9)
    # The processed background's covariance has rank exactly d - D.
    assert np.linalg.matrix_rank(np.cov(y, rowvar=False), tol=1e-8) == x.shape[1] - d_remove


def test_all_but_the_top_with_zero_is_centering():
    x = _background()
    np.testing.assert_allclose(all_but_the_top(x, principal_axes(x), 0), x - x.mean(axis=0), atol=1e-12)


def test_pca_keeps_the_top_k_coordinates_and_the_cosines_of_the_full_centring():
    x = _background()
    axes = principal_axes(x)
    y = pca(x, axes, x.shape[1])
    # Full-rank PCA is a rotation of the centred vectors: same Gram matrix.
    c = x - x.mean(axis=0)
    np.testing.assert_allclose(y @ y.T, c @ c.T, rtol=1e-9, atol=1e-8)
    y3 = pca(x, axes, 3)
    _, values, _ = _reference_axes(x)
    np.testing.assert_allclose(np.var(y3, axis=0, ddof=1), values[:3], rtol=1e-9)


@pytest.mark.parametrize(
    ("call", "needed"),
    [
        (lambda a, x: whiten(x, a, 10), "needs at least 11 background texts"),
        (lambda a, x: pca(x, a, 9), "needs at least 10 background texts"),
        (lambda a, x: all_but_the_top(x, a, 8), "needs at least 9 background texts"),
    ],
)
def test_too_few_background_texts_says_how_many_are_needed(call, needed):
    x = _background(n=6)
    with pytest.raises(InputDataError, match=needed) as err:
        call(principal_axes(x), x)
    assert "got 6" in str(err.value) and "\n" not in str(err.value)


def test_duplicate_texts_lower_the_rank_and_the_error_says_so():
    x = np.repeat(_background(n=3), 5, axis=0)  # 15 vectors, only 3 distinct: rank 2
    axes = principal_axes(x)
    assert axes.eigenvalues.shape == (2,)
    with pytest.raises(InputDataError, match=r"span only 2 directions \(duplicate texts\?\)"):
        whiten(x, axes, 4)


def test_bad_backgrounds_are_one_line_errors():
    with pytest.raises(InputDataError, match="has no vectors; give at least one non-empty background text"):
        background_mean(np.zeros((0, 4)))
    with pytest.raises(InputDataError, match="NaN or Inf"):
        principal_axes(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(InputDataError, match="2-D array"):
        background_mean(np.zeros(4))
    with pytest.raises(InputDataError, match="mean has shape"):
        center(np.zeros((2, 4)), np.zeros(3))
    with pytest.raises(InputDataError, match="only 4 dimensions"):
        whiten(_background(d=4), principal_axes(_background(d=4)), 5)
