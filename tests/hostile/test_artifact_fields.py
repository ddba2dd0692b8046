"""Tampered artifact fields: the loader validates every field once, against the tensors, for every command.

Each case rewrites a good filter (d=16, top 2, bottom 1, reduced: projection 13×16) with one field
or tensor changed, keeping the projection digest consistent so the field itself is what is refused.
`verify` and `apply` must both exit 1 with one `Error:` line naming the field, and leave no output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.filters.artifact import array_sha256
from tests.hostile._util import Snapshot, expect_error

GOOD_BAND = {"hidden_size": 16, "start": 2, "keep": 13, "top": 2, "bottom": 1}


def _tamper(path: Path, metadata: dict[str, str] | None = None, tensors: dict[str, np.ndarray] | None = None) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as handle:
        meta = dict(handle.metadata())
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    meta.update(metadata or {})
    arrays.update(tensors or {})
    meta["projection_sha256"] = array_sha256(arrays["projection"])  # only the tampered field is wrong
    path.unlink()
    save_file(arrays, str(path), metadata=meta)


def _band(**changes: object) -> dict[str, str]:
    return {"band": json.dumps({**GOOD_BAND, **changes})}


CASES = {
    # 1. fields the loader did not validate
    "band-not-json": ({"band": "top=2,keep=13"}, None, "`band`"),
    "band-a-list": ({"band": "[2, 13, 1]"}, None, "`band`"),
    "band-string-number": (_band(start="2"), None, "`band`"),
    "band-missing-key": ({"band": json.dumps({"hidden_size": 16, "start": 2})}, None, "`band`"),
    "hidden-size-not-a-number": ({"hidden_size": "sixteen"}, None, "`hidden_size`"),
    "vocab-size-not-a-number": ({"vocab_size": "200.5"}, None, "`vocab_size`"),
    "vocab-size-zero": ({"vocab_size": "0"}, None, "`vocab_size`"),
    "singular-values-empty": (None, {"singular_values": np.zeros(0)}, "`singular_values`"),
    "singular-values-nan": (None, {"singular_values": np.full(16, np.nan)}, "`singular_values`"),
    "singular-values-2d": (None, {"singular_values": np.ones((4, 4))}, "`singular_values`"),
    "projection-0-rows": (_band(), {"projection": np.zeros((0, 16), np.float32)}, "`projection`"),
    "projection-kind-unknown": ({"projection_kind": "sideways"}, None, "`projection_kind`"),
    # 2. metadata the digest does not cover, cross-checked against the tensors
    "band-keep-vs-rows": (_band(start=1, keep=14, top=1), None, "`band` keep"),
    "band-sums-wrong": (_band(bottom=5), None, "`band`"),
    "band-hidden-size": (_band(hidden_size=32), None, "`band` hidden_size"),
    "hidden-size-impossible": ({"hidden_size": "4096"}, None, "`hidden_size`"),
    "removed-too-few-rows": (None, {"removed_directions": np.zeros((2, 16), np.float32)}, "`removed_directions`"),
    "removed-wrong-width": (None, {"removed_directions": np.zeros((3, 8), np.float32)}, "`removed_directions`"),
    "singular-values-too-many": (None, {"singular_values": np.ones(40)}, "`singular_values`"),
    "kept-indices-out-of-range": (None, {"kept_indices": np.arange(100, 113, dtype=np.int64)}, "`kept_indices`"),
    "projector-not-square": ({"projection_kind": "projector"}, None, "`projection`"),
}


@pytest.fixture
def good(make_filter, tmp_path: Path) -> tuple[Path, Path]:
    path = make_filter()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))
    return path, tmp_path / "x.npy"


def test_the_untampered_filter_passes(runner, good) -> None:
    path, x = good
    _tamper(path)  # a rewrite with nothing changed is still a good filter
    assert runner.invoke(app, ["verify", "-q", str(path)]).exit_code == 0
    result = runner.invoke(app, ["apply", "-q", str(path), str(x), "-o", str(x.parent / "y.npy")])
    assert result.exit_code == 0, result.stderr
    assert np.load(x.parent / "y.npy").shape == (3, 13)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_field_is_refused_by_every_command(runner, good, case: str) -> None:
    path, x = good
    metadata, tensors, field = CASES[case]
    _tamper(path, metadata, tensors)
    snap = Snapshot(x.parent)
    line = expect_error(runner.invoke(app, ["verify", "-q", str(path)]), match=field)
    assert "refit" in line and str(path) in line
    expect_error(runner.invoke(app, ["apply", "-q", str(path), str(x), "-o", str(x.parent / "y.npy")]), match=field)
    snap.assert_unchanged()
    assert not (x.parent / "y.npy").exists()


def test_mean_of_the_wrong_shape_is_refused(runner, good) -> None:
    path, x = good
    mean = np.zeros(5, np.float32)
    _tamper(path, {"centering": "{}", "mean_sha256": array_sha256(mean)}, {"mean": mean})
    snap = Snapshot(x.parent)
    expect_error(runner.invoke(app, ["verify", "-q", str(path)]), match="13 float32 values")
    expect_error(runner.invoke(app, ["apply", "-q", str(path), str(x), "-o", str(x.parent / "y.npy")]), match="mean")
    snap.assert_unchanged()
