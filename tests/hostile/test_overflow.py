"""Finite inputs near float32's limit never come out as Inf/NaN with exit 0 (issue 16, kind 8).

Each case either writes the right numbers (checked against a float64 numpy reference) or is
refused with one `Error:` line and no output. Vectors of ±3e38 overflow a float32 product P·x and
any float32 squared norm; a background of such rows overflows a float32 sum.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from embfilter_cli.filters.artifact import load_artifact
from tests.hostile._util import Snapshot, expect_error

D = 16


def _huge(rows: int = 6, scale: float = 3e38) -> np.ndarray:
    x = np.random.default_rng(3).uniform(-1, 1, (rows, D)).astype(np.float32) * np.float32(scale / 1.0)
    x[0] = np.float32(scale)  # one row at the limit in every position
    x[1, ::2] = -np.float32(scale)
    assert np.isfinite(x).all()
    return x


def _reference(x: np.ndarray, filt: Path, normalize: bool) -> np.ndarray:
    art = load_artifact(filt)
    y = x.astype(np.float64) @ art.projection.astype(np.float64).T
    if art.mean is not None:
        y -= art.mean.astype(np.float64)
    if normalize:
        y /= np.linalg.norm(y, axis=1, keepdims=True)
    return y


def _table(x: np.ndarray) -> pa.Table:
    return pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)})


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    column = pq.read_table(path).column("embedding").combine_chunks()
    return np.asarray(column.flatten().to_numpy()).reshape(len(column), -1)


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
@pytest.mark.parametrize("scale", [3e38, 1e38, 1e-38])
def test_normalised_outputs_of_extreme_inputs_are_the_right_unit_vectors(runner, make_filter, tmp_path, suffix, scale):
    """Before: 3e38 rows gave NaN in Parquet outputs and 1e38 rows gave all-zero "unit" vectors (exit 0)."""
    filt = make_filter()
    x = _huge(scale=scale)
    src = tmp_path / f"x{suffix}"
    np.save(src, x) if suffix == ".npy" else pq.write_table(_table(x), src)
    out = tmp_path / f"y{suffix}"
    result = runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out), "--normalize", "-q"])
    assert result.exit_code == 0, result.stderr
    y = _read(out)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, _reference(x, filt, True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_results_beyond_float32_are_refused_not_written_as_inf(runner, make_filter, tmp_path, suffix):
    filt = make_filter()
    x = _huge()
    src = tmp_path / "in" / f"x{suffix}"
    src.parent.mkdir()
    np.save(src, x) if suffix == ".npy" else pq.write_table(_table(x), src)
    snap = Snapshot(tmp_path)
    out = tmp_path / f"y{suffix}"
    result = runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out)])
    expect_error(result, 1, "exceeds float32's range")
    snap.assert_unchanged()
    ok = runner.invoke(app, ["apply", str(filt), str(src), "-o", str(tmp_path / f"z{suffix}"), "--dtype", "float64"])
    assert ok.exit_code == 0, ok.stderr
    np.testing.assert_allclose(_read(tmp_path / f"z{suffix}"), _reference(x, filt, False), rtol=1e-5)


def test_centring_on_a_background_whose_float32_sum_overflows(runner, make_filter, tmp_path):
    """100 rows of ~3e37: their float32 sum is Inf, their float64 mean is an ordinary number."""
    filt = make_filter()
    rng = np.random.default_rng(0)
    background = (rng.uniform(0.5, 1.0, (100, D)) * 3e37).astype(np.float32)
    assert not np.isfinite(background.sum(axis=0, dtype=np.float32)).all()
    np.save(tmp_path / "bg.npy", background)
    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["center", str(filt), str(tmp_path / "bg.npy"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    art = load_artifact(filt)
    expected = art.projection.astype(np.float64) @ background.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(load_artifact(out).mean, expected, rtol=1e-6)


def test_centring_mean_beyond_float32_is_refused(runner, make_filter, tmp_path):
    filt = make_filter()
    np.save(tmp_path / "bg.npy", np.full((10, D), 3e38, np.float32))
    snap = Snapshot(tmp_path)
    result = runner.invoke(app, ["center", str(filt), str(tmp_path / "bg.npy"), "-o", str(tmp_path / "c.safetensors")])
    expect_error(result, 1, "beyond float32's range")
    snap.assert_unchanged()
