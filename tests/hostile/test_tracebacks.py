"""Inputs that used to end in a traceback now end in one `Error:` line (issue 16, kind 8).

Duplicate column names, non-UTF-8 file names, JSONL records Parquet cannot hold, safetensors
headers of the wrong JSON types read by `verify`, filter certificates that are not JSON objects,
and a disk that fills up inside numpy's `np.save`. Each: exit status, one line, no traceback,
inputs untouched, no output or temporary file left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from tests.hostile._util import Snapshot, expect_error, safetensors_bytes

ROOT = Path(__file__).resolve().parents[2]
D = 16


def _vectors(rows: int = 4) -> pa.FixedSizeListArray:
    x = np.random.default_rng(0).standard_normal((rows, D)).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)


def test_two_vector_columns_with_one_name(runner, make_filter, tmp_path):
    filt = make_filter()
    src = tmp_path / "in" / "dup.parquet"
    src.parent.mkdir()
    pq.write_table(pa.Table.from_arrays([_vectors(), _vectors()], names=["embedding", "embedding"]), src)
    snap = Snapshot(tmp_path)
    result = runner.invoke(app, ["apply", str(filt), str(src), "-o", str(tmp_path / "out.parquet")])
    expect_error(result, 1, "has 2 columns named 'embedding'")
    snap.assert_unchanged()


def test_a_duplicated_passthrough_column_is_kept(runner, make_filter, tmp_path):
    filt = make_filter()
    src = tmp_path / "dup.parquet"
    pq.write_table(
        pa.Table.from_arrays([pa.array([1, 2, 3, 4]), _vectors(), pa.array(list("abcd"))], ["id", "embedding", "id"]),
        src,
    )
    result = runner.invoke(app, ["apply", str(filt), str(src), "-o", str(tmp_path / "out.parquet"), "-q"])
    assert result.exit_code == 0, result.stderr
    assert pq.read_schema(tmp_path / "out.parquet").names == ["id", "embedding", "id"]


def test_a_file_name_that_is_not_utf8(make_filter, tmp_path):
    """A real process: the name travels as bytes (argv), as a shell passes it."""
    filt = make_filter()
    folder = tmp_path / "in"
    folder.mkdir()
    bad = os.fsencode(folder) + b"/bad\xff.parquet"
    table = pa.table({"embedding": _vectors()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    with open(bad, "wb") as fh:
        fh.write(sink.getvalue().to_pybytes())
    snap = Snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBFILTER_DEBUG", None)
    for source, out in (
        (bad, os.fsencode(tmp_path / "out.parquet")),
        (os.fsencode(folder), os.fsencode(tmp_path / "out")),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "embfilter_cli", "apply", os.fsencode(filt), source, "-o", out],
            env=env,
            capture_output=True,
            timeout=120,
        )
        err = done.stderr.decode("utf-8", "replace")
        assert done.returncode == 1, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "bad\\xff.parquet is not valid UTF-8" in err, err
        snap.assert_unchanged()


@pytest.mark.parametrize(
    ("records", "words"),
    [
        (
            [{"text": "a", "n": 1}, {"text": "b", "n": "one"}],
            "field 'n' is a number in record 1 but a string in record 2",
        ),
        ([{"text": "a", "n": 2**70}], "record 1: field 'n' holds the integer 1180591620717411303424, beyond 64 bits"),
        ([{"text": "a", "meta": {}}, {"text": "b", "meta": {}}], "field 'meta' holds empty objects"),
        ([{"text": "a", "tags": [{}]}], "field 'tags' holds empty objects"),
    ],
)
def test_jsonl_records_parquet_cannot_hold(runner, tiny_llama, tmp_path, records, words):
    src = tmp_path / "in" / "t.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    snap = Snapshot(tmp_path)
    args = ["embed", str(src), "-o", str(tmp_path / "e.parquet"), "--model", str(tiny_llama)]
    line = expect_error(runner.invoke(app, args), 1, words)
    assert str(src) in line
    snap.assert_unchanged()


def test_jsonl_with_mixed_ints_and_floats_still_embeds(runner, tiny_llama, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "a", "n": 1}\n{"text": "b", "n": 2.5}\n')
    args = ["embed", str(src), "-o", str(tmp_path / "e.parquet"), "--model", str(tiny_llama), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(tmp_path / "e.parquet").column("n").to_pylist() == [1.0, 2.5]


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"__metadata__": [1, 2]}, "__metadata__ is not an object of strings"),
        ({"__metadata__": {"embfilter.projection_sha256": 5}}, "__metadata__ is not an object of strings"),
        ({"e": {"dtype": "F32", "shape": ["4", D], "data_offsets": [0, 4 * D * 4]}}, "header entry 'e' is malformed"),
    ],
)
def test_verify_vectors_on_safetensors_headers_of_the_wrong_types(runner, make_filter, tmp_path, header, words):
    filt = make_filter()
    header = {"e": {"dtype": "F32", "shape": [4, D], "data_offsets": [0, 4 * D * 4]}, **header}
    path = tmp_path / "v.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * (4 * D * 4)))
    expect_error(runner.invoke(app, ["verify", str(filt), "--vectors", str(path)]), 1, words)


@pytest.mark.parametrize("certificate", ["not json{", "[1, 2]", '"text"'])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_verify_a_filter_whose_certificate_is_not_a_json_object(runner, make_filter, tmp_path, certificate, json_flag):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    filt = make_filter()
    with safe_open(str(filt), "np") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={**meta, "certificate": certificate})
    result = runner.invoke(app, ["verify", str(edited), *json_flag])
    expect_error(result, 1, "metadata `certificate`")
    assert result.stdout == ""


@pytest.mark.parametrize("fp16", [False, True])
def test_export_npy_on_a_disk_that_fills_up_mid_write(runner, make_filter, tmp_path, fp16):
    """numpy's np.save reports a cut-short write as OSError without errno ("N requested and M written")."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    filt = make_filter(d=512, rows=600)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        out = small / "p.npy"
        args = ["export", str(filt), "--format", "npy", "-o", str(out), *(["--fp16"] if fp16 else [])]
        line = expect_error(runner.invoke(app, args), 1, "the disk is full")
        assert str(out) in line
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
