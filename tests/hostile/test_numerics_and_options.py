"""Numerically hostile heads and vectors, and option values that must be usage errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from tests.hostile._util import Snapshot, expect_error, head_file


def _planted(rows: int, d: int, scale: float, dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sig = np.geomspace(1.0, 0.05, d)
    w = (u * sig) @ v.T
    w = w / np.abs(w).max() * scale
    return w.astype(dtype), np.linalg.svd(w.astype(dtype).astype(np.float64) / scale, compute_uv=False) * scale


@pytest.mark.parametrize(
    ("scale", "dtype", "solver"),
    [
        (3.0e38, np.float32, ["--solver", "exact"]),
        (3.0e38, np.float32, ["--solver", "exact", "--precision", "float32"]),
        (3.0e38, np.float32, ["--solver", "randomized", "--oversample", "4"]),
        (1.0e150, np.float64, ["--solver", "exact"]),
        (1.0e-200, np.float64, ["--solver", "exact"]),
    ],
    ids=["f32-max-exact", "f32-max-exact-f32", "f32-max-randomized", "f64-1e150", "f64-tiny"],
)
def test_huge_or_tiny_finite_heads_give_a_correct_finite_filter(runner, tmp_path, scale, dtype, solver):
    w, sigma = _planted(64, 8, scale, dtype)
    model = head_file(tmp_path / "m.safetensors", values=w)
    out = tmp_path / "f.safetensors"
    result = runner.invoke(app, ["fit", "-q", "-m", str(model), "--rank", "2", "-o", str(out), "--json", *solver])
    assert result.exit_code == 0, result.stderr
    from embfilter_cli.filters.artifact import load_artifact

    art = load_artifact(out)
    assert np.isfinite(art.projection).all() and np.isfinite(art.singular_values).all()
    n = len(art.singular_values)
    np.testing.assert_allclose(art.singular_values, sigma[:n], rtol=1e-4)
    assert json.loads(result.stdout)["certificate"]["passed"] is True


def test_head_whose_squares_overflow_float64_is_refused(runner, tmp_path):
    w, _ = _planted(64, 8, 1e300, np.float64)
    model = head_file(tmp_path / "m.safetensors", values=w)
    before = Snapshot(tmp_path)
    expect_error(
        runner.invoke(app, ["fit", "-q", "-m", str(model), "--rank", "2", "-o", str(tmp_path / "f.safetensors")]),
        match="too large",
    )
    before.assert_unchanged()


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_all_zero_head_is_refused(runner, tmp_path, solver):
    model = head_file(tmp_path / "m.safetensors", values=np.zeros((64, 8), np.float32))
    before = Snapshot(tmp_path)
    args = ["fit", "-q", "-m", str(model), "--rank", "2", "--solver", solver, "-o", str(tmp_path / "f.safetensors")]
    expect_error(runner.invoke(app, args), match="all zeros")
    before.assert_unchanged()


def test_apply_never_writes_infinities(runner, art, tmp_path):
    x = np.full((3, 16), 3.0e38, np.float32)
    np.save(tmp_path / "x.npy", x)
    before = Snapshot(tmp_path)
    out = tmp_path / "y.npy"
    result = runner.invoke(app, ["apply", "-q", str(art), str(tmp_path / "x.npy"), "-o", str(out)])
    if result.exit_code == 0:  # the float64 retry kept every value in range
        assert np.isfinite(np.load(out)).all()
    else:
        expect_error(result, match="exceeds")
        before.assert_unchanged()


def test_apply_overflowing_float32_output_fails_unless_allowed(runner, art, tmp_path):
    x = np.full((3, 16), 1.0e300, np.float64)
    np.save(tmp_path / "x.npy", x)
    before = Snapshot(tmp_path)
    args = ["apply", "-q", str(art), str(tmp_path / "x.npy"), "--dtype", "float32", "-o", str(tmp_path / "y.npy")]
    expect_error(runner.invoke(app, args), match="exceeds")
    before.assert_unchanged()
    ok = runner.invoke(app, [*args, "--allow-nonfinite"])
    assert ok.exit_code == 0, ok.stderr


# --------------------------------------------------------------------------- options


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return head_file(tmp_path / "m.safetensors")


@pytest.mark.parametrize(
    "args",
    [
        ["--keep", "4", "--rank", "2"],
        ["--keep", "4", "--bottom", "1"],
        ["--ratio", "nan"],
        ["--ratio", "inf"],
        ["--ratio", "0.5"],
        ["--rank", "-1"],
        ["--start", "-2"],
        ["--keep", "0"],
        ["--seed", str(2**64)],
        ["--seed", "-1"],
        ["--solver", "randomized", "--oversample", "-3"],
        ["--solver", "randomized", "--tol", "0"],
        ["--solver", "randomized", "--tol", "nan"],
        ["--solver", "randomized", "--tol", "-1"],
    ],
)
def test_fit_option_values_are_usage_errors(runner, model, tmp_path, args):
    before = Snapshot(tmp_path)
    expect_error(runner.invoke(app, ["fit", "-q", "-m", str(model), "-o", str(tmp_path / "f.safetensors"), *args]), 2)
    before.assert_unchanged()


@pytest.mark.parametrize("size", ["0", str(10**12), "-5"])
def test_absurd_batch_sizes_are_usage_errors(runner, art, tmp_path, size):
    np.save(tmp_path / "x.npy", np.ones((2, 16), np.float32))
    before = Snapshot(tmp_path)
    args = ["apply", str(art), str(tmp_path / "x.npy"), "--batch-size", size, "-o", str(tmp_path / "y.npy")]
    expect_error(runner.invoke(app, args), 2)
    before.assert_unchanged()
    expect_error(runner.invoke(app, ["embed", "--batch-size", size, "x"]), 2)


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '<f4', 'fortran_order': True, 'shape': (100000000000, 100000), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-3, 4), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, -4), }",
    ],
    ids=["fortran-huge", "negative-rows", "negative-dim"],
)
def test_npy_headers_with_absurd_shapes(runner, art, tmp_path, header):
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 64)
    before = Snapshot(tmp_path)
    args = ["apply", "-q", str(art), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]
    expect_error(runner.invoke(app, args))
    before.assert_unchanged()
