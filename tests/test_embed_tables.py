"""`embfilter embed` with Parquet: a text column in, an `embedding` column out (engines.embed_tables).

Checked against the encoder called directly on the same texts (tiny Llama, CPU); the Ray variant
against the local one, in the session's single Ray (see tests/test_engines.py).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from embfilter_cli.engines.embed_tables import EmbedBatch
from embfilter_cli.text.embedding import load_encoder

TEXTS = ["The cat sat on the mat.", "", "Stocks fell sharply.", None, "A dog ran."]


@pytest.fixture(scope="module")
def encoder(tiny_llama):
    return load_encoder(str(tiny_llama), device="cpu")


def _corpus(path, texts=TEXTS, first_id=0):
    ids = list(range(first_id, first_id + len(texts)))
    pq.write_table(pa.table({"id": ids, "body": pa.array(texts, pa.string()), "lang": ["en"] * len(texts)}), path)


def _rows(table: pa.Table) -> list:
    return table.column("embedding").to_pylist()


def test_parquet_in_parquet_out_matches_the_encoder_and_keeps_rows(runner, tiny_llama, encoder, tmp_path):
    _corpus(tmp_path / "c.parquet")
    out = tmp_path / "e.parquet"
    result = runner.invoke(
        app,
        ["embed", str(tmp_path / "c.parquet"), "--text-column", "body", "-o", str(out), "--model", str(tiny_llama),
         "--device", "cpu", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["rows"], doc["files"], doc["empty_texts"]) == (5, 1, 2)
    assert "2 empty or null text(s) kept as rows with a null embedding" in result.stderr
    table = pq.read_table(out)
    assert table.schema.names == ["id", "body", "lang", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), encoder.hidden_size)
    rows = _rows(table)
    assert rows[1] is None and rows[3] is None
    ref = encoder.embed([t for t in TEXTS if t])
    np.testing.assert_allclose(np.array([rows[i] for i in (0, 2, 4)]), ref, rtol=1e-4, atol=1e-5)
    assert table.schema.metadata[b"embfilter.embed_model"]


def test_filter_and_normalize_and_lines_to_parquet(runner, tiny_llama, encoder, make_filter, tmp_path):
    from embfilter_cli.filters.artifact import save_artifact
    from embfilter_cli.filters.band import band_from_rank
    from embfilter_cli.filters.fitting import build_artifact
    from embfilter_cli.filters.spectral import exact_spectrum
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.model.unembedding import read_unembedding

    w = read_unembedding(resolve_model(str(tiny_llama)))
    art = build_artifact(
        exact_spectrum(w.matrix), band_from_rank(w.hidden_size, 3, 1), reduce=True, model_source="tiny",
        model_revision="local", tensor_name=w.tensor_name, unembedding_sha256=w.sha256, vocab_size=w.vocab_size,
    )  # fmt: skip
    filt = save_artifact(art, tmp_path / "f.safetensors")
    (tmp_path / "t.txt").write_text("The cat sat.\nA dog ran.\n")
    out = tmp_path / "e.parquet"
    args = ["embed", str(tmp_path / "t.txt"), "-o", str(out), "--model", str(tiny_llama), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--filter", str(filt), "--normalize"])
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    assert table.column("text").to_pylist() == ["The cat sat.", "A dog ran."]
    ref = art.apply(encoder.embed(["The cat sat.", "A dog ran."]).astype(np.float64))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(_rows(table)), ref, rtol=1e-4, atol=1e-5)
    meta = table.schema.metadata
    assert meta[b"embfilter.projection_sha256"].decode() == art.metadata["projection_sha256"]
    assert runner.invoke(app, ["verify", str(filt), "--vectors", str(out)]).exit_code == 0


def test_missing_text_column_lists_the_columns(runner, tiny_llama, tmp_path):
    _corpus(tmp_path / "c.parquet")
    result = runner.invoke(
        app, ["embed", str(tmp_path / "c.parquet"), "-o", str(tmp_path / "e.parquet"), "--model", str(tiny_llama)]
    )
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("Error: ") and "has no column 'text' (its columns: id int64, body string, lang string)" in line
    )
    assert not (tmp_path / "e.parquet").exists()


def test_embed_batch_pickles_without_the_model(tiny_llama):
    import pickle

    eb = EmbedBatch(str(tiny_llama), "body", device="cpu")
    eb.encoder  # noqa: B018
    assert pickle.loads(pickle.dumps(eb))._encoder is None


def test_embed_with_ray_equals_local(runner, tiny_llama, tmp_path, ray_session):
    (tmp_path / "data").mkdir()
    _corpus(tmp_path / "data" / "a.parquet")
    _corpus(tmp_path / "data" / "b.parquet", ["One more.", "And another one."], first_id=5)
    common = ["--text-column", "body", "--model", str(tiny_llama), "--device", "cpu", "-q"]
    local = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "local"), *common])
    assert local.exit_code == 0, local.stderr
    ray = runner.invoke(
        app,
        [
            "embed",
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "ray"),
            *common,
            "--engine",
            "ray",
            "--concurrency",
            "2",
        ],
    )
    assert ray.exit_code == 0, ray.stderr
    for name in ("a.parquet", "b.parquet"):
        a, b = pq.read_table(tmp_path / "local" / name), pq.read_table(tmp_path / "ray" / name)
        assert a.column("id").equals(b.column("id"))
        np.testing.assert_allclose(
            np.array([r or [0.0] * 32 for r in _rows(a)]), np.array([r or [0.0] * 32 for r in _rows(b)]), atol=1e-5
        )
