"""The solvers against float64 references on matrices whose answer is known."""

import numpy as np
import pytest
import torch

from embfilter_cli.errors import BadTensorError, SolverAccuracyError
from embfilter_cli.filters.spectral import canonical_signs, exact_spectrum, randomized_spectrum
from tests.conftest import planted_matrix


def _subspace_sin(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal-angle sine between the column spans of a and b (orthonormal columns)."""
    s = np.linalg.svd(a.T @ b, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - s.min() ** 2)))


def test_exact_recovers_planted_spectrum_to_float64_accuracy():
    d = 48
    sig = np.geomspace(300.0, 0.5, d)
    w, v = planted_matrix(2000, d, sig)
    spec = exact_spectrum(torch.from_numpy(w), chunk_rows=128)  # float64 input: nothing lost in storage
    np.testing.assert_allclose(spec.singular_values, sig, rtol=1e-11)
    cos = np.abs(np.sum(spec.vectors * v, axis=0))
    assert cos.min() > 1 - 1e-12
    assert spec.certificate["max_backward_error"] < 1e-13
    assert spec.frobenius_sq == pytest.approx(float((sig**2).sum()), rel=1e-12)


def test_exact_matches_torch_float64_svd_of_float32_and_bf16_inputs():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(700, 40) * torch.linspace(3, 0.1, 40)).to(dtype)
        ref = torch.linalg.svd(w.double(), full_matrices=False)
        spec = exact_spectrum(w, chunk_rows=64)
        np.testing.assert_allclose(spec.singular_values, ref.S.numpy(), rtol=1e-10)
        ref_v = canonical_signs(ref.Vh.T.numpy())
        np.testing.assert_allclose(spec.vectors, ref_v, atol=1e-9)


def test_sign_convention_largest_entry_positive_and_deterministic():
    w = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    a = exact_spectrum(w).vectors
    b = exact_spectrum(-w).vectors  # W and -W have the same right singular vectors up to sign
    np.testing.assert_allclose(a, b, atol=1e-12)
    idx = np.argmax(np.abs(a), axis=0)
    assert (a[idx, np.arange(a.shape[1])] > 0).all()


def test_chunking_does_not_change_the_answer():
    w = torch.randn(1000, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    one = exact_spectrum(w, chunk_rows=10_000)
    many = exact_spectrum(w, chunk_rows=7)
    np.testing.assert_allclose(one.singular_values, many.singular_values, rtol=1e-13)
    np.testing.assert_allclose(one.vectors, many.vectors, atol=1e-11)


def test_randomized_is_accurate_on_a_slowly_decaying_spectrum():
    # A SmolLM2-like shape: one huge direction, then a slow power-law decay with no gap at the cut.
    d, rank = 96, 24
    sig = np.concatenate([[500.0], 100.0 * np.arange(2, d + 1) ** -0.35])
    w, v = planted_matrix(3000, d, sig, seed=3)
    spec = randomized_spectrum(torch.from_numpy(w).float(), rank, tol=1e-4, seed=0)
    assert spec.certificate["passed"] and spec.certificate["max_relative_residual"] <= 1e-4
    np.testing.assert_allclose(spec.singular_values, sig[:rank], rtol=1e-4)
    assert _subspace_sin(spec.vectors, v[:, :rank]) < 1e-2


def test_randomized_fixed_iterations_and_strict_certificate():
    d = 64
    sig = 100.0 * np.arange(1, d + 1) ** -0.2  # almost flat: one pass cannot certify
    w, _ = planted_matrix(800, d, sig, seed=4)
    with pytest.raises(SolverAccuracyError, match="--tol"):
        randomized_spectrum(torch.from_numpy(w).float(), 16, power_iters=1, tol=1e-8)
    loose = randomized_spectrum(torch.from_numpy(w).float(), 16, power_iters=1, tol=1e-8, strict=False)
    assert loose.certificate["passed"] is False and loose.certificate["iterations"] == 1


def test_randomized_seed_is_reproducible():
    w = torch.randn(500, 32, generator=torch.Generator().manual_seed(5))
    a = randomized_spectrum(w, 4, seed=7)
    b = randomized_spectrum(w, 4, seed=7)
    np.testing.assert_array_equal(a.vectors, b.vectors)


def test_nonfinite_values_are_reported_with_their_position():
    w = torch.randn(100, 8)
    w[37, 5] = float("nan")
    with pytest.raises(BadTensorError, match="row 37, column 5"):
        exact_spectrum(w, chunk_rows=16)
    w[37, 5] = float("inf")
    with pytest.raises(BadTensorError, match="row 37, column 5"):
        randomized_spectrum(w, 2)


def test_float32_precision_is_float32_accurate_and_labelled():
    d = 32
    sig = np.geomspace(200.0, 1.0, d)
    w, _v = planted_matrix(4000, d, sig, seed=6)
    w32 = torch.from_numpy(w).float()
    ref = exact_spectrum(w32)  # float64 Gram of the same float32 input
    fast = exact_spectrum(w32, precision="float32", chunk_rows=512)
    assert fast.params["precision"] == "float32" and ref.params["precision"] == "float64"
    rel = np.abs(fast.singular_values - ref.singular_values) / ref.singular_values
    # σ_i² carries an absolute error ~ eps32·σ_1², so small σ lose relative accuracy: bounded, not exact.
    assert rel.max() < 1e-3 and rel.max() > 1e-12
    assert np.abs(np.sum(fast.vectors[:, :4] * ref.vectors[:, :4], axis=0)).min() > 1 - 1e-6
    with pytest.raises(Exception, match="precision must be float64 or float32"):
        exact_spectrum(w32, precision="float16")
