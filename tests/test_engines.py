"""The Ray and Spark engines against numpy and against the local engine, on tiny Parquet data.

Ray and Spark each start once per test session (`ray.init(num_cpus=2)`, `local[2]`), in conftest's
`ray_session` and `spark` fixtures, which skip when the extra is not installed (CI installs both
through the `test` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import MissingDependencyError
from embfilter_cli.filters.artifact import load_artifact
from embfilter_cli.vectors.arrow_batches import FilterBatch

D, K = 16, 13


@pytest.fixture
def filt(make_filter) -> Path:
    return make_filter()


def _x(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float32)


def _ref(x: np.ndarray, filter_path: Path) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ load_artifact(filter_path).projection.astype(np.float64).T


def _dataset(folder: Path, sizes=(6, 4, 5)) -> np.ndarray:
    folder.mkdir(parents=True)
    xs, first = [], 0
    for i, n in enumerate(sizes):
        x = _x(n, seed=i)
        ids = np.arange(first, first + n)
        table = pa.table(
            {"id": ids, "embedding": pa.array(list(x), pa.list_(pa.float32())), "tag": [f"t{j}" for j in ids]}
        )
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=2)
        xs.append(x)
        first += n
    return np.concatenate(xs)


def _vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    return np.asarray(table.column(column).combine_chunks().flatten().to_numpy()).reshape(table.num_rows, -1)


# --------------------------------------------------------------------------- Ray


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def test_ray_engine_gives_the_local_files_exactly(runner, filt, tmp_path, ray_session):
    x = _dataset(tmp_path / "data")
    local = runner.invoke(app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "local"), "-q"])
    assert local.exit_code == 0, local.stderr
    result = runner.invoke(
        app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "ray"), "--engine", "ray", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["files"], doc["rows"]) == (3, 15)
    for name in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        assert pq.read_table(tmp_path / "ray" / name).equals(pq.read_table(tmp_path / "local" / name))
    whole = pa.concat_tables([pq.read_table(tmp_path / "ray" / f"part-{i}.parquet") for i in range(3)])
    np.testing.assert_allclose(_vectors(whole), _ref(x, filt), rtol=1e-5, atol=1e-5)
    resumed = runner.invoke(
        app,
        [
            "apply",
            str(filt),
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "ray"),
            "--engine",
            "ray",
            "--resume",
            "--json",
        ],
    )
    assert resumed.exit_code == 0 and len(json.loads(resumed.stdout)["skipped"]) == 3


def test_ray_actor_failure_exits_1_and_reports_no_output_as_complete(runner, filt, tmp_path, ray_session):
    _dataset(tmp_path / "data")
    bad = pa.table({"id": [0], "embedding": pa.array([[1.0] * 12], pa.list_(pa.float32())), "tag": ["x"]})
    pq.write_table(bad, tmp_path / "data" / "part-1.parquet")
    result = runner.invoke(
        app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--engine", "ray"]
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[-1].startswith("Error: ") and "part-1.parquet row 0" in lines[-1], result.stderr
    assert not (tmp_path / "out" / "part-1.parquet").exists()
    assert not list((tmp_path / "out").rglob(".*.tmp")) if (tmp_path / "out").exists() else True


@pytest.mark.skipif(not _has_ray(), reason="the ray extra is not installed")
def test_ray_runs_keep_ray_s_own_log_lines_off_stderr(filt, tmp_path):
    """A real process (Ray's handlers and its C++ core write to the real stderr, which CliRunner
    does not capture): a success prints nothing, a failure exactly our one `Error:` line."""
    import os
    import subprocess

    _dataset(tmp_path / "data")
    # PYTHONWARNINGS=default: Ray's own DeprecationWarnings (DataContext's deprecated fields) must not show either
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "default"}
    env.pop("EMBFILTER_DEBUG", None)
    cmd = [sys.executable, "-m", "embfilter_cli", "apply", str(filt), str(tmp_path / "data"), "--engine", "ray"]
    ok = subprocess.run([*cmd, "-o", str(tmp_path / "ok")], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    bad = pa.table({"id": [0], "embedding": pa.array([[1.0] * 12], pa.list_(pa.float32())), "tag": ["x"]})
    pq.write_table(bad, tmp_path / "data" / "part-1.parquet")
    failed = subprocess.run([*cmd, "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), failed.stderr


def test_filter_batch_in_a_users_own_ray_pipeline(filt, tmp_path, ray_session):
    x = _dataset(tmp_path / "data")
    ds = ray_session.data.read_parquet(str(tmp_path / "data"))
    ds = ds.map_batches(FilterBatch, fn_constructor_args=(str(filt),), batch_format="pyarrow", concurrency=1)
    ds.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out").sort_by("id")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), K)  # a plain fixed-size list
    np.testing.assert_allclose(_vectors(table), _ref(x, filt), rtol=1e-5, atol=1e-5)


def test_missing_ray_names_the_pip_command(runner, filt, tmp_path, monkeypatch):
    _dataset(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = runner.invoke(
        app, ["apply", str(filt), str(tmp_path / "data"), "-o", str(tmp_path / "o"), "--engine", "ray"]
    )
    assert result.exit_code == 1
    assert "pip install 'embfilter[ray]'" in result.stderr and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- Spark


def test_spark_filter_dataframe_matches_numpy(filt, spark):
    from embfilter_cli.engines.spark import filter_dataframe

    x = _x(12)
    df = spark.createDataFrame(
        [(i, x[i].tolist(), f"t{i}") for i in range(12)], "id long, embedding array<float>, tag string"
    )
    out = filter_dataframe(df.repartition(2), filt).orderBy("id").collect()
    assert [r["id"] for r in out] == list(range(12)) and out[3]["tag"] == "t3"
    got = np.array([r["embedding"] for r in out])
    assert got.shape == (12, K)
    np.testing.assert_allclose(got, _ref(x, filt), rtol=1e-5, atol=1e-5)


def test_spark_bad_column_and_missing_pyspark(filt, spark, monkeypatch):
    from embfilter_cli.engines.spark import filter_dataframe
    from embfilter_cli.errors import InputDataError

    df = spark.createDataFrame([(1, "a")], "id long, s string")
    with pytest.raises(InputDataError, match=r"its columns: id bigint, s string"):
        filter_dataframe(df, filt)
    monkeypatch.setitem(sys.modules, "pyspark", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'embfilter\[spark\]'"):
        filter_dataframe(df, filt)


def test_spark_second_call_gets_its_own_settings(filt, spark, make_filter):
    """Spark reuses its Python workers: a later call with other settings (normalize, another column,
    float64, another filter) must not be served the first call's cached settings (issue 16, kind 6)."""
    from embfilter_cli.engines.spark import filter_dataframe

    x, z = _x(10, seed=3), _x(10, seed=4) * 5
    df = spark.createDataFrame(
        [(i, x[i].tolist(), z[i].tolist()) for i in range(10)], "id long, embedding array<float>, other array<float>"
    ).coalesce(1)  # one partition: the calls below run in the same Python worker
    ref_x, ref_z = _ref(x, filt), _ref(z, filt)

    def run(frame, column: str) -> np.ndarray:
        return np.array([r[column] for r in frame.orderBy("id").collect()], dtype=np.float64)

    plain = run(filter_dataframe(df, filt, "embedding"), "embedding")
    np.testing.assert_allclose(plain, ref_x, rtol=1e-5, atol=1e-5)
    unit = run(filter_dataframe(df, filt, "embedding", normalize=True), "embedding")
    np.testing.assert_allclose(unit, ref_x / np.linalg.norm(ref_x, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    other = filter_dataframe(df, filt, "other", dtype="float64")
    assert dict(other.dtypes)["other"] == "array<double>" and dict(other.dtypes)["embedding"] == "array<float>"
    np.testing.assert_allclose(run(other, "other"), ref_z, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(run(other, "embedding"), x, rtol=0, atol=0)  # passed through untouched
    filt2 = make_filter(seed=7, name="g.safetensors")  # another file on the same worker: its own projection
    np.testing.assert_allclose(
        run(filter_dataframe(df, filt2, "embedding"), "embedding"), _ref(x, filt2), rtol=1e-5, atol=1e-5
    )
