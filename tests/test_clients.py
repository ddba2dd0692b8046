"""`apply`'s Parquet output in the clients people query it with: DuckDB, LanceDB, Polars.

Each runs a nearest-neighbour query the way the README's ecosystem table writes it, and the ranking
must equal numpy's cosine ranking of the same filtered vectors (ids compared exactly; distances
within 1e-5, float32 arithmetic in the engines).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app

duckdb = pytest.importorskip("duckdb")
lancedb = pytest.importorskip("lancedb")
polars = pytest.importorskip("polars")

N, D, TOP = 40, 16, 5


@pytest.fixture
def filtered(runner, make_filter, tmp_path):
    """(apply's Parquet output, its filtered vectors as numpy, a query vector in the filtered space)."""
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((N, D)).astype(np.float32)
    table = pa.table({"id": np.arange(N), "embedding": pa.array(list(raw), type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "vectors.parquet")
    out = tmp_path / "filtered.parquet"
    result = runner.invoke(app, ["apply", str(make_filter()), str(tmp_path / "vectors.parquet"), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    vectors = np.stack(pq.read_table(out).column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    query = vectors[7] + 0.3 * rng.standard_normal(vectors.shape[1])
    return out, vectors, query.astype(np.float32)


def _numpy_top(vectors: np.ndarray, query: np.ndarray) -> tuple[list[int], np.ndarray]:
    q = query.astype(np.float64)
    cos = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q))
    order = np.argsort(-cos, kind="stable")[:TOP]
    return order.tolist(), cos[order]


def test_duckdb_needs_one_cast_for_array_functions(filtered):
    path, vectors, query = filtered
    k = vectors.shape[1]
    want, cos = _numpy_top(vectors, query)
    con = duckdb.connect()
    assert con.sql(f"DESCRIBE SELECT * FROM '{path}'").fetchall()[1][1] == "FLOAT[]"  # Parquet has no fixed size
    # The query from the README: cast the column to FLOAT[k] for array_cosine_similarity (and the vss index).
    rows = con.execute(
        f"SELECT id, array_cosine_similarity(embedding::FLOAT[{k}], ?::FLOAT[{k}]) AS score "
        f"FROM '{path}' ORDER BY score DESC LIMIT {TOP}",
        [query.tolist()],
    ).fetchall()
    assert [r[0] for r in rows] == want
    np.testing.assert_allclose([r[1] for r in rows], cos, rtol=0, atol=1e-5)
    # Without the cast DuckDB refuses the array function; the list function works as it is.
    with pytest.raises(duckdb.BinderException):
        con.execute(f"SELECT array_cosine_similarity(embedding, ?::FLOAT[{k}]) FROM '{path}'", [query.tolist()])
    rows = con.execute(
        f"SELECT id FROM '{path}' ORDER BY list_cosine_similarity(embedding, ?) DESC LIMIT {TOP}", [query.tolist()]
    ).fetchall()
    assert [r[0] for r in rows] == want


def test_lancedb_indexes_the_column_as_it_is(filtered, tmp_path):
    path, vectors, query = filtered
    want, cos = _numpy_top(vectors, query)
    db = lancedb.connect(tmp_path / "lance")
    table = db.create_table("docs", pq.read_table(path))
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    hits = table.search(query, vector_column_name="embedding").distance_type("cosine").limit(TOP).to_arrow()
    assert hits.column("id").to_pylist() == want
    np.testing.assert_allclose(hits.column("_distance").to_numpy(), 1 - cos, rtol=0, atol=1e-5)


def test_polars_reads_a_fixed_size_array(filtered):
    path, vectors, _ = filtered
    frame = polars.read_parquet(path)
    assert frame.schema["embedding"] == polars.Array(polars.Float32, vectors.shape[1])
    np.testing.assert_array_equal(frame["embedding"].to_numpy().astype(np.float64), vectors)
