import numpy as np
import pytest
import torch

from embfilter_cli.errors import BandError
from embfilter_cli.filters.band import band_from_rank
from embfilter_cli.filters.fitting import build_artifact, energy_removed, projection_from_spectrum
from embfilter_cli.filters.spectral import exact_spectrum, randomized_spectrum
from tests.conftest import planted_matrix

D = 20
SIG = np.geomspace(50.0, 1.0, D)


@pytest.fixture(scope="module")
def spectrum_and_v():
    w, v = planted_matrix(400, D, SIG, seed=11)
    return exact_spectrum(torch.from_numpy(w)), v


def test_reduced_map_is_the_kept_singular_directions(spectrum_and_v):
    spec, v = spectrum_and_v
    proj = projection_from_spectrum(spec, band_from_rank(D, 3, 2))
    assert proj.matrix.shape == (15, D)
    np.testing.assert_allclose(proj.matrix @ proj.matrix.T, np.eye(15), atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(proj.matrix * v[:, 3:18].T, axis=1)), 1.0, atol=1e-10)
    assert proj.kept_indices.tolist() == list(range(3, 18))
    assert proj.removed.shape == (5, D)


def test_reduced_and_projector_give_identical_cosines(spectrum_and_v):
    spec, _ = spectrum_and_v
    band = band_from_rank(D, 4, 3)
    p = projection_from_spectrum(spec, band, reduce=True).matrix
    full = projection_from_spectrum(spec, band, reduce=False).matrix
    np.testing.assert_allclose(full, p.T @ p, atol=1e-12)  # I - V_e V_eᵀ = Pᵀ P
    x = np.random.default_rng(0).standard_normal((6, D))
    a, b = x @ p.T, x @ full.T
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-10)


def test_energy_removed_is_the_removed_share_of_sigma_squared(spectrum_and_v):
    spec, _ = spectrum_and_v
    band = band_from_rank(D, 2, 1)
    expected = (SIG[:2] ** 2).sum() + SIG[-1] ** 2
    assert energy_removed(spec, band) == pytest.approx(expected / (SIG**2).sum(), rel=1e-10)


def test_partial_spectrum_removes_top_and_keeps_the_complement():
    w, v = planted_matrix(400, D, SIG, seed=12)
    spec = randomized_spectrum(torch.from_numpy(w).float(), 4, tol=1e-6)
    proj = projection_from_spectrum(spec, band_from_rank(D, 4, 0))
    assert proj.matrix.shape == (16, D) and proj.kept_indices.size == 0
    np.testing.assert_allclose(proj.matrix @ proj.matrix.T, np.eye(16), atol=1e-10)
    # The kept space is orthogonal to the true top-4 directions (to solver accuracy).
    assert np.abs(proj.matrix @ v[:, :4]).max() < 1e-4
    with pytest.raises(BandError, match="nothing at the bottom"):
        projection_from_spectrum(spec, band_from_rank(D, 4, 1))


def test_artifact_metadata_is_all_strings(spectrum_and_v):
    spec, _ = spectrum_and_v
    art = build_artifact(
        spec,
        band_from_rank(D, 2, 0),
        reduce=True,
        model_source="m",
        model_revision="local",
        tensor_name="lm_head.weight",
        unembedding_sha256="ab" * 32,
        vocab_size=400,
    )
    assert all(isinstance(v, str) for v in art.metadata.values())
    assert art.projection.dtype == np.float32 and art.output_dim == 18
