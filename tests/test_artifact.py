"""Artifact round trip, golden header bytes, and every way a file can be wrong."""

import json
import struct

import numpy as np
import pytest

from embfilter_cli.errors import ArtifactError, OutputExistsError
from embfilter_cli.filters.artifact import FORMAT_VERSION, load_artifact, newest_artifact, save_artifact


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def test_round_trip_keeps_tensors_and_metadata(make_filter):
    path = make_filter(d=16, top=2, bottom=1)
    art = load_artifact(path)
    assert art.projection.shape == (13, 16) and art.projection.dtype == np.float32
    assert art.singular_values.shape == (16,) and art.singular_values.dtype == np.float64
    assert art.kept_indices.tolist() == list(range(2, 15))
    assert art.removed_directions.shape == (3, 16)
    assert art.band == {"hidden_size": 16, "start": 2, "keep": 13, "top": 2, "bottom": 1}
    assert art.metadata["format_version"] == FORMAT_VERSION
    np.testing.assert_allclose(art.projection @ art.projection.T, np.eye(13), atol=1e-6)


def test_header_layout_is_stable(make_filter):
    header = _header(make_filter(d=8, top=1, bottom=1))
    assert sorted(k for k in header if k != "__metadata__") == [
        "kept_indices",
        "projection",
        "removed_directions",
        "singular_values",
    ]
    assert header["projection"]["dtype"] == "F32" and header["projection"]["shape"] == [6, 8]
    assert header["singular_values"]["dtype"] == "F64"
    assert header["kept_indices"]["dtype"] == "I64"
    meta = header["__metadata__"]
    assert meta["format"] == "embfilter.filter" and meta["format_version"] == "2"
    assert "mean" not in header and "centering" not in meta and "mean_sha256" not in meta  # uncentred
    for key in (
        "model_source",
        "model_revision",
        "tensor_name",
        "unembedding_sha256",
        "vocab_size",
        "hidden_size",
        "band",
        "solver",
        "solver_params",
        "certificate",
        "tool_version",
        "created_utc",
        "projection_sha256",
    ):
        assert key in meta


def test_refuses_to_overwrite_without_force(make_filter):
    path = make_filter()
    art = load_artifact(path)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        save_artifact(art, path)
    assert path.read_bytes() == before
    save_artifact(art, path, force=True)
    assert not list(path.parent.glob(".*.tmp"))


def test_failed_write_leaves_nothing(make_filter, tmp_path, monkeypatch):
    art = load_artifact(make_filter())
    import safetensors.numpy

    def boom(*args, **kwargs):
        with open(args[1], "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    target = tmp_path / "new.safetensors"
    with pytest.raises(OSError):
        save_artifact(art, target)
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "damage", ["truncate", "garbage", "flip_projection", "other_safetensors", "missing", "dir", "version"]
)
def test_bad_files_are_explained(make_filter, tmp_path, damage):
    path = make_filter()
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
        needle = "not a readable safetensors file"
    elif damage == "garbage":
        path.write_bytes(b"hello world, not a tensor file" * 10)
        needle = "not a readable safetensors file"
    elif damage == "flip_projection":
        raw = bytearray(path.read_bytes())
        header = _header(path)
        (n,) = struct.unpack("<Q", raw[:8])
        start = 8 + n + header["projection"]["data_offsets"][0]
        raw[start + 3] ^= 0x40
        path.write_bytes(bytes(raw))
        needle = "does not match its stored SHA-256"
    elif damage == "other_safetensors":
        from safetensors.numpy import save_file

        save_file({"x": np.zeros(3, np.float32)}, str(path))
        needle = "not an embfilter filter"
    elif damage == "missing":
        path = tmp_path / "nope.safetensors"
        needle = "does not exist; run `embfilter fit`"
    elif damage == "dir":
        path = tmp_path
        needle = "is a directory"
    else:
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        with safe_open(str(path), "numpy") as fh:
            meta = dict(fh.metadata())
        meta["format_version"] = "99"
        save_file(load_file(str(path)), str(path), metadata=meta)
        needle = "format version '99'"
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_newest_artifact(make_filter, tmp_path):
    with pytest.raises(ArtifactError, match="run `embfilter fit` first"):
        newest_artifact(tmp_path / "empty")
    a = make_filter(name="a.safetensors")
    b = make_filter(name="b.safetensors")
    import os

    os.utime(a, (1, 1))
    assert newest_artifact(tmp_path) == b


def test_apply_checks_dimension(make_filter):
    art = load_artifact(make_filter(d=16))
    with pytest.raises(ArtifactError, match="dimension 15 but the filter expects 16"):
        art.apply(np.zeros((2, 15), np.float32))
    out = art.apply(np.ones((3, 16), np.float32))
    assert out.shape == (3, 13) and out.dtype == np.float32


def test_saved_artifacts_get_normal_permissions(make_filter):
    import os

    umask = os.umask(0o022)
    try:
        path = make_filter(name="perm.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
