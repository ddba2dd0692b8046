"""`verify --vectors` checks what a file proves, not only the metadata it carries (issue 16, kind 5).

Each lie starts from a real `apply` output and copies its `embfilter.*` metadata onto something the
filter did not write: raw vectors, a table without a vector column, vectors that are not unit
length under `normalized=true`, raw vectors under a projector filter. Each must fail with one
`Error:` line naming the file and the reason; every honest output (all formats, dtypes and
options `apply` offers) must still pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from tests.hostile._util import expect_error, safetensors_bytes

D, K = 16, 13  # make_filter's default: d=16, top 2 and bottom 1 removed


def _x(rows: int, d: int = D, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)


def _table(x: np.ndarray, meta: dict[bytes, bytes] | None = None) -> pa.Table:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.table({"id": np.arange(len(x)), "embedding": vectors}).replace_schema_metadata(meta)


def _apply(runner, filt: Path, src: Path, out: Path, *extra: str) -> Path:
    result = runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out), "-q", *extra])
    assert result.exit_code == 0, result.stderr
    return out


def _verify(runner, filt: Path, path: Path):
    return runner.invoke(app, ["verify", str(filt), "--vectors", str(path)])


@pytest.fixture
def real(runner, make_filter, tmp_path) -> tuple[Path, Path, dict[bytes, bytes]]:
    """(filter, a real Parquet output of it, that output's schema metadata)."""
    filt = make_filter()
    pq.write_table(_table(_x(20)), tmp_path / "in.parquet")
    out = _apply(runner, filt, tmp_path / "in.parquet", tmp_path / "out.parquet")
    meta = pq.read_schema(out).metadata
    assert b"embfilter.projection_sha256" in meta
    return filt, out, meta


def test_raw_vectors_with_copied_metadata_fail_on_their_width(runner, real, tmp_path):
    filt, _, meta = real
    lie = tmp_path / "raw.parquet"
    pq.write_table(_table(_x(5), meta), lie)
    line = expect_error(_verify(runner, filt, lie), 1, "has 16 values but this filter outputs 13")
    assert str(lie) in line and "metadata was copied or edited" in line


def test_a_table_without_a_vector_column_fails(runner, real, tmp_path):
    filt, _, meta = real
    lie = tmp_path / "novec.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}).replace_schema_metadata(meta), lie)
    expect_error(_verify(runner, filt, lie), 1, "no vector column")


def test_wrong_value_type_fails(runner, real, tmp_path):
    filt, _, meta = real
    lie = tmp_path / "ints.parquet"
    ints = pa.array([[1] * K, [2] * K], pa.list_(pa.int32()))
    pq.write_table(pa.table({"id": [1, 2], "embedding": ints}).replace_schema_metadata(meta), lie)
    expect_error(_verify(runner, filt, lie), 1, "ints.parquet")


def test_normalized_claim_is_checked_against_the_lengths(runner, real, tmp_path):
    filt, out, meta = real
    lie = tmp_path / "claims-unit.parquet"
    table = pq.read_table(out)
    claimed = {**meta, b"embfilter.normalized": b"true"}
    pq.write_table(table.replace_schema_metadata(claimed), lie)
    expect_error(_verify(runner, filt, lie), 1, "although its metadata says the vectors were normalised")


def test_raw_vectors_under_a_projector_filter_fail_on_the_subspace(runner, make_filter, tmp_path):
    """A projector (`--no-reduce`) keeps the width d, so only the data's subspace tells raw from filtered."""
    filt = make_filter(reduce=False, name="proj.safetensors")
    pq.write_table(_table(_x(8)), tmp_path / "in.parquet")
    out = _apply(runner, filt, tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert _verify(runner, filt, out).exit_code == 0
    lie = tmp_path / "raw.parquet"
    pq.write_table(_table(_x(8, seed=2), pq.read_schema(out).metadata), lie)
    expect_error(_verify(runner, filt, lie), 1, "is not in this filter's kept subspace")


def test_arrow_and_safetensors_lies_fail_too(runner, real, tmp_path):
    filt, _, meta = real
    arrow_lie = tmp_path / "raw.arrow"
    feather.write_feather(_table(_x(4), meta), arrow_lie)
    expect_error(_verify(runner, filt, arrow_lie), 1, "has 16 values but this filter outputs 13")

    np.save(tmp_path / "x.npy", _x(6))
    st_out = _apply(runner, filt, tmp_path / "x.npy", tmp_path / "y.safetensors")
    header_len = int.from_bytes(st_out.read_bytes()[:8], "little")
    st_meta = json.loads(st_out.read_bytes()[8 : 8 + header_len])["__metadata__"]
    raw = _x(6)
    header = {"__metadata__": st_meta, "embeddings": {"dtype": "F32", "shape": [6, D], "data_offsets": [0, raw.nbytes]}}
    st_lie = tmp_path / "raw.safetensors"
    st_lie.write_bytes(safetensors_bytes(header, raw.tobytes()))
    expect_error(_verify(runner, filt, st_lie), 1, "has vectors of 16 values but this filter outputs 13")


def test_a_folder_fails_on_the_one_lie_among_honest_files(runner, real, tmp_path):
    filt, out, meta = real
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(out.read_bytes())
    pq.write_table(_table(_x(3), meta), folder / "b.parquet")
    line = expect_error(_verify(runner, filt, folder), 1, "b.parquet")
    assert "a.parquet" not in line


@pytest.mark.parametrize(
    ("reduce", "extra", "suffix"),
    [
        (True, [], ".parquet"),
        (True, ["--normalize"], ".parquet"),
        (True, ["--normalize", "--dtype", "float16"], ".parquet"),
        (True, ["--dtype", "float64"], ".arrow"),
        (False, ["--normalize"], ".parquet"),
        (False, ["--dtype", "float16"], ".arrow"),
        (True, ["--normalize"], ".safetensors"),
        (False, ["--dtype", "bfloat16"], ".safetensors"),
    ],
)
def test_honest_outputs_still_pass(runner, make_filter, tmp_path, reduce, extra, suffix):
    filt = make_filter(reduce=reduce, name="f.safetensors")
    x = _x(300) * 40 + 3  # lengths far from 1 and a common offset (removed-direction energy) before filtering
    x[7] = 0  # an all-zero row stays zero under --normalize
    if suffix == ".safetensors":
        np.save(tmp_path / "in.npy", x)
        src = tmp_path / "in.npy"
    else:
        pq.write_table(_table(x), tmp_path / "in.parquet")
        src = tmp_path / "in.parquet"
    out = _apply(runner, filt, src, tmp_path / f"out{suffix}", *extra)
    result = runner.invoke(app, ["verify", str(filt), "--vectors", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "vectors")
    assert check["ok"] and check["values"]["rows"] == 300
