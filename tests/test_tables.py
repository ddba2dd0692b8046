"""Parquet and Arrow in `embfilter apply`: `vectors.arrow_batches`, `vectors.tables`, `vectors.shards`.

Every numeric result is compared with a float64 numpy reference x @ Pᵀ; every bad input checks
the one-line message, the exit status, and that no partial output (or temporary file) was left.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from embfilter_cli.commands import _tables as tables_cmd
from embfilter_cli.errors import InputDataError
from embfilter_cli.filters.artifact import load_artifact
from embfilter_cli.vectors import shards
from embfilter_cli.vectors.arrow_batches import FilterBatch, column_vectors, find_vector_column

D, K = 16, 13  # make_filter's default: d=16, top 2 and bottom 1 removed


@pytest.fixture
def filt(make_filter) -> Path:
    return make_filter()


def _x(rows: int, seed: int = 1, d: int = D, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, d)).astype(dtype)


def _ref(x: np.ndarray, filter_path: Path) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ load_artifact(filter_path).projection.astype(np.float64).T


def _table(x: np.ndarray, kind: str = "list", column: str = "embedding", first_id: int = 0) -> pa.Table:
    value_type = pa.from_numpy_dtype(x.dtype)
    if kind == "fixed":
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), value_type), x.shape[1])
    else:
        vectors = pa.array(list(x), pa.large_list(value_type) if kind == "large" else pa.list_(value_type))
    ids = np.arange(first_id, first_id + len(x))
    return pa.table({"id": ids, column: vectors, "tag": [f"t{i}" for i in ids]})


def _vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    return np.asarray(table.column(column).combine_chunks().flatten().to_numpy()).reshape(table.num_rows, -1)


def _one_line_error(result, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert needle in lines[0], lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


# --------------------------------------------------------------------------- the batch callable


@pytest.mark.parametrize("kind", ["list", "large", "fixed"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_filter_batch_matches_numpy_and_keeps_other_columns(filt, kind, dtype):
    x = _x(9, dtype=dtype)
    table = _table(x, kind)
    out = FilterBatch(filt)(table)
    assert out.schema.names == ["id", "embedding", "tag"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), K)
    assert out.column("id").to_pylist() == list(range(9)) and out.column("tag").to_pylist()[2] == "t2"
    np.testing.assert_allclose(_vectors(out), _ref(x.astype(np.float32), filt), rtol=1e-5, atol=1e-5)


def test_filter_batch_on_a_sliced_record_batch_dtype_and_normalize(filt):
    x = _x(10, dtype=np.float64)
    batch = _table(x).to_batches()[0].slice(3, 5)  # offsets inside the arrays must be honoured
    out = FilterBatch(filt, dtype="float64", normalize=True)(batch)
    ref = _ref(x[3:8], filt)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert out.schema.field("embedding").type == pa.list_(pa.float64(), K)
    np.testing.assert_allclose(_vectors(pa.Table.from_batches([out])), ref, rtol=1e-12, atol=1e-12)


def test_filter_batch_pickles_the_path_not_the_matrix(filt):
    fb = FilterBatch(filt)
    fb(_table(_x(2)))  # loads the artifact
    clone = pickle.loads(pickle.dumps(fb))
    assert clone._artifact is None and len(pickle.dumps(fb)) < 1000
    np.testing.assert_array_equal(_vectors(clone(_table(_x(4)))), _vectors(fb(_table(_x(4)))))


def test_output_schema_carries_the_fingerprints(filt):
    fb = FilterBatch(filt, normalize=True)
    schema = fb.output_schema(_table(_x(1)).schema)
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    art = load_artifact(filt)
    assert meta["embfilter.projection_sha256"] == art.metadata["projection_sha256"]
    assert meta["embfilter.unembedding_sha256"] == art.unembedding_sha256
    assert meta["embfilter.model_source"] == "test/planted"
    assert json.loads(meta["embfilter.band"]) == art.band
    assert meta["embfilter.normalized"] == "true" and meta["embfilter.column"] == "embedding"


def test_find_vector_column_rule():
    lst = pa.list_(pa.float32())
    assert find_vector_column(pa.schema([("vector", lst), ("embeddings", lst)]), None, "f") == "embeddings"
    assert find_vector_column(pa.schema([("id", pa.int64()), ("emb", lst)]), None, "f") == "emb"
    with pytest.raises(InputDataError, match=r"f has no columns of float lists .* \(its columns: id int64, s string\)"):
        find_vector_column(pa.schema([("id", pa.int64()), ("s", pa.string())]), None, "f")
    with pytest.raises(InputDataError, match="f has several columns of float lists"):
        find_vector_column(pa.schema([("a", lst), ("b", lst)]), None, "f")
    with pytest.raises(InputDataError, match=r"f has no column 'emb' \(its columns: a list<float>\); pass --column"):
        find_vector_column(pa.schema([("a", lst)]), "emb", "f")
    with pytest.raises(InputDataError, match=r"column 'embedding' is list<int64>, not a list of floats"):
        find_vector_column(pa.schema([("embedding", pa.list_(pa.int64()))]), None, "f")


def test_column_vectors_nulls_and_dimensions():
    arr = pa.array([[1.0, 2.0], None, [3.0, None], [4.0, 5.0]], pa.list_(pa.float32()))
    with pytest.raises(InputDataError, match=r"^f row 11: the vector in column 'e' is null; .*--allow-null"):
        column_vectors(arr, 2, name="f", column="e", row_offset=10)
    with pytest.raises(InputDataError, match=r"^f row 2: the vector in column 'e' holds a null value"):
        column_vectors(arr.slice(2), 2, name="f", column="e", row_offset=2)
    x, valid = column_vectors(arr, 2, name="f", column="e", allow_null=True)
    np.testing.assert_array_equal(x, [[1, 2], [4, 5]])
    assert valid.tolist() == [True, False, False, True]
    ragged = pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]], pa.list_(pa.float64()))
    with pytest.raises(InputDataError, match=r"^f row 1: the vector in column 'e' has 3 values but 2 are expected"):
        column_vectors(ragged, 2, name="f", column="e")


def test_null_rows_stay_null_with_allow_null(filt):
    x = _x(3)
    vectors = pa.array([list(x[0]), None, list(x[2])], pa.list_(pa.float32()))
    fb = FilterBatch(filt, allow_null=True)
    out = fb(pa.table({"embedding": vectors}))
    assert out.column("embedding").null_count == 1 and out.column("embedding")[1].as_py() is None
    got = np.array([out.column("embedding")[i].as_py() for i in (0, 2)])
    np.testing.assert_allclose(got, _ref(x[[0, 2]], filt), rtol=1e-5, atol=1e-5)
    assert fb.null_rows == 1


# --------------------------------------------------------------------------- shards


def test_shard_parse_and_blocks():
    assert shards.Shard.parse("3/16") == shards.Shard(3, 16)
    for bad in ("5/4", "4/4", "-1/4", "1", "a/b", "1/0"):
        with pytest.raises(ValueError):
            shards.Shard.parse(bad)
    blocks = [list(shards.Shard(i, 4).select(10)) for i in range(4)]
    assert [i for block in blocks for i in block] == list(range(10)) and sorted(map(len, blocks)) == [2, 2, 3, 3]
    assert [list(shards.Shard(i, 3).select(1)) for i in range(3)] == [[], [], [0]]


def test_cli_table_constants_mirror_the_core():
    assert tables_cmd.TABLE_EXTENSIONS == shards.TABLE_EXTENSIONS
    assert set(tables_cmd.TABLE_FORMATS) == set(shards.OUTPUT_SUFFIX)


# --------------------------------------------------------------------------- the command: files and folders


def _dataset(folder: Path, sizes=(7, 5, 9), kind="list", seed=0) -> np.ndarray:
    """Parquet files a.parquet, b.parquet, sub/c.parquet… with consecutive ids; returns all vectors."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["a.parquet", "b.parquet", "sub/c.parquet", "sub/d.parquet"]
    xs, first = [], 0
    for i, n in enumerate(sizes):
        x = _x(n, seed=seed + i)
        path = folder / names[i]
        path.parent.mkdir(exist_ok=True)
        pq.write_table(_table(x, kind, first_id=first), path, row_group_size=3)
        xs.append(x)
        first += n
    return np.concatenate(xs)


def _read_all(folder: Path) -> pa.Table:
    files = sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith("."))
    return pa.concat_tables([pq.read_table(p) for p in files])


def test_parquet_file_to_file(runner, filt, tmp_path):
    x = _x(20)
    pq.write_table(_table(x, "fixed"), tmp_path / "v.parquet", row_group_size=6)
    out = tmp_path / "f.parquet"
    result = runner.invoke(
        app, ["-v", "apply", str(filt), str(tmp_path / "v.parquet"), "-o", str(out), "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "Filtered 20 vectors 16 → 13 dims (float32)" in result.stderr and "1 file written" in result.stderr
    table = pq.read_table(out)
    assert table.schema.names == ["id", "embedding", "tag"] and table.column("id").to_pylist() == list(range(20))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), K)
    np.testing.assert_allclose(_vectors(table), _ref(x, filt), rtol=1e-5, atol=1e-5)
    assert (
        table.schema.metadata[b"embfilter.projection_sha256"]
        == load_artifact(filt).metadata["projection_sha256"].encode()
    )
    assert _leftovers(tmp_path) == []


def test_folder_to_folder_keeps_names_and_glob_equals_folder(runner, filt, tmp_path):
    x = _dataset(tmp_path / "data")
    (tmp_path / "data" / "_SUCCESS").write_text("")
    r1 = runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--json"])
    assert r1.exit_code == 0, r1.stderr
    doc = json.loads(r1.stdout)
    assert (doc["files"], doc["rows"], doc["skipped"]) == (3, 21, [])
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")) == [
        "a.parquet",
        "b.parquet",
        "sub",
        "sub/c.parquet",
    ]
    whole = _read_all(tmp_path / "out")
    assert whole.column("id").to_pylist() == list(range(21))
    np.testing.assert_allclose(_vectors(whole), _ref(x, filt), rtol=1e-5, atol=1e-5)
    r2 = runner.invoke(app, ["apply", str(filt), f"{tmp_path}/data/**/*.parquet", "-o", str(tmp_path / "g"), "-q"])
    assert r2.exit_code == 0, r2.stderr
    assert _read_all(tmp_path / "g").equals(whole)


@pytest.mark.parametrize("count", [2, 4])
def test_shards_of_a_dataset_unite_to_the_whole(runner, filt, tmp_path, count):
    _dataset(tmp_path / "data")
    assert (
        runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "whole"), "-q"]).exit_code
        == 0
    )
    for i in range(count):
        result = runner.invoke(
            app,
            ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "sharded"), "--shard", f"{i}/{count}"],
        )
        assert result.exit_code == 0, result.stderr
    assert _read_all(tmp_path / "sharded").equals(_read_all(tmp_path / "whole"))


def test_shards_of_one_file_split_row_groups_and_concatenate_to_the_whole(runner, filt, tmp_path):
    x = _x(20)
    pq.write_table(_table(x), tmp_path / "v.parquet", row_group_size=3)  # 7 row groups
    parts = []
    for i in range(3):
        out = tmp_path / f"part-{i}.parquet"
        result = runner.invoke(
            app, ["apply", str(filt), str(tmp_path / "v.parquet"), "-o", str(out), "--shard", f"{i}/3"]
        )
        assert result.exit_code == 0, result.stderr
        parts.append(pq.read_table(out))
    assert [p.num_rows for p in parts] == [6, 6, 8]
    whole = pa.concat_tables(parts)
    assert whole.column("id").to_pylist() == list(range(20))
    np.testing.assert_allclose(_vectors(whole), _ref(x, filt), rtol=1e-5, atol=1e-5)


def test_bad_shard_is_a_usage_error(runner, filt, tmp_path):
    _dataset(tmp_path / "data")
    result = runner.invoke(
        app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "o"), "--shard", "5/4"]
    )
    assert result.exit_code == 2
    assert "shard index 5 must be below the shard count 4" in result.stderr
    assert not (tmp_path / "o").exists()


def test_resume_after_a_simulated_kill(runner, filt, tmp_path):
    _dataset(tmp_path / "data", sizes=(7, 5, 9))
    out = tmp_path / "out"
    args = ["apply", str(filt), str(tmp_path / "data"), "-o", str(out)]
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0
    reference = _read_all(out)
    # The kill: a.parquet finished, b.parquet was being written (only its temporary file exists),
    # sub/c.parquet is a truncated leftover from some other copy.
    os.utime(out / "a.parquet", (1, 1))
    (out / "b.parquet").rename(out / ".b.parquet.x1y2.tmp")
    data = (out / "sub" / "c.parquet").read_bytes()
    (out / "sub" / "c.parquet").write_bytes(data[: len(data) // 2])
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    _one_line_error(again, "a.parquet already exists; pass --resume")
    result = runner.invoke(app, [*args, "--resume", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["skipped"] == [str(out / "a.parquet")] and doc["files"] == 2 and doc["rows"] == 14
    assert os.stat(out / "a.parquet").st_mtime == 1  # not rewritten
    assert _leftovers(out) == []
    assert _read_all(out).equals(reference)


def test_resume_redoes_outputs_of_another_normalisation_and_refuses_foreign_files(runner, filt, make_filter, tmp_path):
    _dataset(tmp_path / "data", sizes=(4,))
    out = tmp_path / "out"
    assert (
        runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(out), "-q", "--normalize"]).exit_code
        == 0
    )
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(out), "--resume", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["files"] == 1
    other = make_filter(seed=5, name="g.safetensors")
    result = runner.invoke(app, ["apply", str(other), str(tmp_path / "data"), "-o", str(out), "--resume"])
    assert result.exit_code == 1
    _one_line_error(result, "was not made by this filter")
    assert (
        runner.invoke(app, ["apply", str(other), str(tmp_path / "data"), "-o", str(out), "--force", "-q"]).exit_code
        == 0
    )


# --------------------------------------------------------------------------- Arrow IPC


def _ipc_stream(table: pa.Table, batch_rows: int = 4) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_arrow_ipc_through_stdin_and_stdout(runner, filt):
    x = _x(10)
    result = runner.invoke(app, ["apply", str(filt), "-", "--format", "arrow", "-o", "-"], input=_ipc_stream(_table(x)))
    assert result.exit_code == 0, result.stderr
    table = pa.ipc.open_stream(result.stdout_bytes).read_all()
    assert table.column("id").to_pylist() == list(range(10))
    np.testing.assert_allclose(_vectors(table), _ref(x, filt), rtol=1e-5, atol=1e-5)


def test_arrow_ipc_through_real_pipes_in_many_batches(filt):
    """producer | embfilter apply F - --format arrow -o - | consumer, with OS pipes, not in-process buffers.

    The producer writes in 4 KiB pieces that cut record batches anywhere, while the test reads
    embfilter's stdout at the same time: reads of a pipe return short, unlike an in-memory buffer.
    """
    import subprocess
    import sys
    import threading

    x = _x(5000, seed=4)
    payload = _ipc_stream(_table(x), batch_rows=97)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embfilter_cli", "apply", str(filt), "-", "--format", "arrow", "-o", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )

    def produce() -> None:
        assert proc.stdin is not None
        for start in range(0, len(payload), 4096):  # pipe-sized writes
            proc.stdin.write(payload[start : start + 4096])
            proc.stdin.flush()
        proc.stdin.close()

    producer = threading.Thread(target=produce)
    producer.start()
    assert proc.stdout is not None
    table = pa.ipc.open_stream(proc.stdout).read_all()
    producer.join(timeout=120)
    err = proc.stderr.read() if proc.stderr is not None else b""
    assert proc.wait(timeout=120) == 0, err
    assert err == b""
    assert table.column("id").to_pylist() == list(range(5000))
    np.testing.assert_allclose(_vectors(table), _ref(x, filt), rtol=1e-5, atol=1e-5)


def test_parquet_to_arrow_file_and_back(runner, filt, tmp_path):
    x = _x(8)
    pq.write_table(_table(x), tmp_path / "v.parquet")
    assert (
        runner.invoke(app, ["apply", str(filt), str(tmp_path / "v.parquet"), "-o", str(tmp_path / "v.arrow")]).exit_code
        == 0
    )
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "v.arrow"))).read_all()
    np.testing.assert_allclose(_vectors(table), _ref(x, filt), rtol=1e-5, atol=1e-5)
    # Arrow file in, Parquet out: the filtered k-dim vectors do not fit the d-dim filter
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "v.arrow"), "-o", str(tmp_path / "w.parquet")])
    assert result.exit_code == 1
    _one_line_error(result, "v.arrow row 0: the vector in column 'embedding' has 13 values but the filter expects 16")
    assert not (tmp_path / "w.parquet").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{p}", "-o", "-"], "works only as an Arrow IPC stream both ways"),
        (["{p}", "-o", "{t}/o.parquet", "--dtype", "bfloat16"], "hold float16, float32 or float64"),
        (["{p}", "-o", "{t}/o.npy"], "tables give tables"),
        (["-", "--format", "parquet", "-o", "-"], "Parquet needs random access"),
        (["{t}/x.npy", "-o", "{t}/o.npy", "--shard", "0/2"], "--shard apply to Parquet/Arrow inputs only"),
    ],
)
def test_table_usage_errors_exit_2(runner, filt, tmp_path, args, needle):
    pq.write_table(_table(_x(3)), tmp_path / "v.parquet")
    np.save(tmp_path / "x.npy", _x(3))
    result = runner.invoke(app, ["apply", str(filt)] + [a.format(p=tmp_path / "v.parquet", t=tmp_path) for a in args])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and result.stdout == ""
    assert not list(tmp_path.glob("o.*"))


# --------------------------------------------------------------------------- bad input


def test_no_vector_column_lists_columns_and_types(runner, filt, tmp_path):
    pq.write_table(
        pa.table({"id": [1, 2], "emb": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32()))}), tmp_path / "v.parquet"
    )
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "v.parquet"), "-o", str(tmp_path / "o.parquet")])
    assert result.exit_code == 1 and result.stdout == ""
    _one_line_error(result, "(its columns: id int64, emb list<int32>); pass --column NAME")
    assert not (tmp_path / "o.parquet").exists() and _leftovers(tmp_path) == []


def test_mixed_dimensions_name_the_file_and_row_and_keep_earlier_outputs(runner, filt, tmp_path):
    _dataset(tmp_path / "data", sizes=(4, 4))
    bad = _table(_x(3))
    bad = bad.set_column(1, "embedding", pa.array([list(r) for r in _x(2)] + [[1.0] * 12], pa.list_(pa.float32())))
    pq.write_table(bad, tmp_path / "data" / "b.parquet")
    out = tmp_path / "out"
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(out)])
    assert result.exit_code == 1
    _one_line_error(result, f"{tmp_path / 'data' / 'b.parquet'} row 2: the vector in column 'embedding' has 12 values")
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet"] and _leftovers(out) == []


def test_nulls_fail_with_file_and_row_or_pass_with_allow_null(runner, filt, tmp_path):
    x = _x(3)
    pq.write_table(
        pa.table({"embedding": pa.array([list(x[0]), list(x[1]), None], pa.list_(pa.float32()))}),
        tmp_path / "v.parquet",
    )
    args = ["apply", str(filt), str(tmp_path / "v.parquet"), "-o", str(tmp_path / "o.parquet")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    _one_line_error(result, "v.parquet row 2: the vector in column 'embedding' is null")
    assert not (tmp_path / "o.parquet").exists()
    result = runner.invoke(app, [*args, "--allow-null"])
    assert result.exit_code == 0 and "1 input vectors were null" in result.stderr
    assert pq.read_table(tmp_path / "o.parquet").column("embedding").null_count == 1


def test_corrupt_file_is_named_other_outputs_kept_and_resume_finishes(runner, filt, tmp_path):
    _dataset(tmp_path / "data", sizes=(4, 4, 4))
    good = (tmp_path / "data" / "b.parquet").read_bytes()
    (tmp_path / "data" / "b.parquet").write_bytes(good[: len(good) - 30])
    out = tmp_path / "out"
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(out)])
    assert result.exit_code == 1
    _one_line_error(result, f"{tmp_path / 'data' / 'b.parquet'} is not a readable Parquet file")
    assert sorted(p.name for p in out.rglob("*.parquet")) == [] and _leftovers(tmp_path) == []
    # a file damaged inside its data (footer intact) fails while running: earlier outputs stay
    (tmp_path / "data" / "b.parquet").write_bytes(good[:4] + b"\x00" * 40 + good[44:])
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(out)])
    assert result.exit_code == 1
    _one_line_error(result, "b.parquet is not a readable Parquet file")
    assert sorted(p.name for p in out.rglob("*.parquet")) == ["a.parquet"] and _leftovers(out) == []
    (tmp_path / "data" / "b.parquet").write_bytes(good)
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(out), "--resume", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == [str(out / "a.parquet")]
    assert _read_all(out).column("id").to_pylist() == list(range(12))


def test_nan_needs_allow_nonfinite(runner, filt, tmp_path):
    x = _x(4)
    x[2, 5] = np.nan
    pq.write_table(_table(x), tmp_path / "v.parquet")
    args = ["apply", str(filt), str(tmp_path / "v.parquet"), "-o", str(tmp_path / "o.parquet")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    _one_line_error(result, "v.parquet row 2 has nan at position 5")
    assert runner.invoke(app, [*args, "--allow-nonfinite"]).exit_code == 0


# --------------------------------------------------------------------------- verify --vectors


def test_verify_vectors_checks_a_file_and_a_folder(runner, filt, make_filter, tmp_path):
    _dataset(tmp_path / "data", sizes=(3, 4))
    out = tmp_path / "out"
    assert runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(out), "-q"]).exit_code == 0
    ok = runner.invoke(app, ["verify", str(filt), "--vectors", str(out), "--json"])
    assert ok.exit_code == 0, ok.stderr
    check = next(c for c in json.loads(ok.stdout)["checks"] if c["name"] == "vectors")
    assert check["ok"] and check["values"] == {"path": str(out), "files": 2, "rows": 7, "files_failed": 0}
    other = make_filter(seed=5, name="g.safetensors")
    bad = runner.invoke(app, ["verify", str(other), "--vectors", str(out)])
    assert bad.exit_code == 1
    _one_line_error(bad, f"{out / 'a.parquet'} was made by another filter")
    pq.write_table(_table(_x(2)), out / "raw.parquet")  # vectors filtered by nothing
    none = runner.invoke(app, ["verify", str(filt), "--vectors", str(out / "raw.parquet")])
    assert none.exit_code == 1
    _one_line_error(none, "raw.parquet records no filter")
    missing = runner.invoke(app, ["verify", str(filt), "--vectors", str(tmp_path / "nope")])
    assert missing.exit_code == 1
    _one_line_error(missing, "does not exist")


def test_verify_vectors_reads_safetensors_outputs_of_apply(runner, filt, tmp_path):
    np.save(tmp_path / "x.npy", _x(5))
    out = tmp_path / "y.safetensors"
    assert runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(out)]).exit_code == 0
    result = runner.invoke(app, ["verify", str(filt), "--vectors", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "vectors")["values"]["rows"] == 5


def test_centred_filter_subtracts_its_mean_and_is_told_apart(runner, filt, tmp_path):
    from embfilter_cli.filters.artifact import save_artifact
    from tests.test_centering import _record

    mean = np.linspace(-1, 1, K).astype(np.float32)
    centred = save_artifact(load_artifact(filt).with_mean(mean, _record()), tmp_path / "c.safetensors")
    x = _x(6)
    pq.write_table(_table(x), tmp_path / "v.parquet")
    out = tmp_path / "o.parquet"
    assert runner.invoke(app, ["apply", str(centred), str(tmp_path / "v.parquet"), "-o", str(out)]).exit_code == 0
    np.testing.assert_allclose(_vectors(pq.read_table(out)), _ref(x, filt) - mean, rtol=1e-5, atol=1e-5)
    assert runner.invoke(app, ["verify", str(centred), "--vectors", str(out)]).exit_code == 0
    plain = runner.invoke(app, ["verify", str(filt), "--vectors", str(out)])
    assert plain.exit_code == 1
    _one_line_error(plain, "was made with the same projection but a mean")
    resumed = runner.invoke(app, ["apply", str(filt), str(tmp_path / "v.parquet"), "-o", str(out), "--resume"])
    assert resumed.exit_code == 1
    _one_line_error(resumed, "was not made by this filter")
