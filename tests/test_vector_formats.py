"""Each vector format's reader and writer against an independent reference (np.load/np.save,
json, safetensors' own loader, torch's bfloat16), through the package's public registry."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from embfilter_cli.errors import InputDataError
from embfilter_cli.vectors import registry, stream
from embfilter_cli.vectors.base import Batch, Passthrough, SinkOptions
from embfilter_cli.vectors.dtypes import bfloat16_to_float32, float32_to_bfloat16, float_dtype_name

RNG = np.random.default_rng(7)
P = RNG.standard_normal((3, 5))


def _read_all(fmt: str, data: bytes, *, dim: int = 5, path: Path | None = None, **kw) -> tuple[np.ndarray, object]:
    fp = path.open("rb") if path is not None else io.BytesIO(data)
    source = registry.open_source(fp, fmt, "in", path=path, expected_dim=dim, **kw)
    try:
        rows = [b.vectors.copy() for b in source.items(2) if isinstance(b, Batch)]
    finally:
        source.close()
    return (np.concatenate(rows) if rows else np.empty((0, dim))), source


def _filter(fmt_in: str, data: bytes, fmt_out: str, *, seekable: bool = False, **kw) -> bytes:
    source = registry.open_source(io.BytesIO(data), fmt_in, "in", expected_dim=P.shape[1])
    out = io.BytesIO()
    sink = registry.open_sink(out, fmt_out, SinkOptions(seekable=seekable, source=source))
    stream.filter_stream(source, sink, P, batch_rows=2, **kw)
    return out.getvalue()


def _npy(x: np.ndarray, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(x) if fortran else x)
    return buf.getvalue()


# ---------------------------------------------------------------- npy


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", ">f4"])
def test_npy_reader_matches_np_load(dtype):
    x = RNG.standard_normal((5, 5)).astype(dtype)
    got, source = _read_all("npy", _npy(x))
    np.testing.assert_array_equal(got, x.astype(np.float64))
    assert source.dtype == float_dtype_name(np.dtype(dtype))


def test_npy_reader_fortran_order_and_memory_map(tmp_path):
    x = RNG.standard_normal((6, 5)).astype(np.float32)
    got, _ = _read_all("npy", _npy(x, fortran=True))
    np.testing.assert_array_equal(got, x)
    path = tmp_path / "x.npy"
    np.save(path, x)
    got, source = _read_all("npy", b"", path=path)
    np.testing.assert_array_equal(got, x)
    assert source.rows == 6


def test_npy_writer_output_loads_with_np_load_and_keeps_lead_axes():
    x = RNG.standard_normal((2, 3, 5))  # rank 3: the filter acts on the last axis
    out = np.load(io.BytesIO(_filter("npy", _npy(x), "npy")))
    assert out.shape == (2, 3, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out, x @ P.T, rtol=1e-12)


def test_npy_writer_output_dtype():
    x = RNG.standard_normal((4, 5))
    out = np.load(io.BytesIO(_filter("npy", _npy(x), "npy", output_dtype="float16")))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, (x @ P.T).astype(np.float16))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_npy(np.arange(10, dtype=np.int32).reshape(2, 5)), "holds int32 values"),
        (_npy(np.float32(1.0)), "single number"),
        (b"not an npy file at all", "is not a .npy file"),
    ],
    ids=["int", "scalar", "magic"],
)
def test_npy_reader_errors(data, needle):
    with pytest.raises(InputDataError, match=needle):
        _read_all("npy", data)


def test_wrong_dimension_names_it():
    with pytest.raises(InputDataError, match="4-dimensional"):
        _filter("npy", _npy(RNG.standard_normal((2, 4))), "npy")


# ---------------------------------------------------------------- jsonl


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_jsonl_reader_and_writer_keep_other_fields():
    x = RNG.standard_normal((3, 5))
    records = [{"id": i, "meta": {"k": [i]}, "embedding": row.tolist()} for i, row in enumerate(x)]
    got, _ = _read_all("jsonl", _jsonl(records))
    np.testing.assert_array_equal(got, x)  # JSON floats are float64 and round-trip exactly
    lines = _filter("jsonl", _jsonl(records), "jsonl").decode().splitlines()
    out = [json.loads(line) for line in lines]
    assert [(r["id"], r["meta"]) for r in out] == [(i, {"k": [i]}) for i in range(3)]
    np.testing.assert_allclose(np.array([r["embedding"] for r in out]), x @ P.T, rtol=1e-12)


def test_jsonl_custom_field():
    got, _ = _read_all("jsonl", _jsonl([{"v": [1, 2, 3, 4, 5]}]), field="v")
    np.testing.assert_array_equal(got, [[1, 2, 3, 4, 5]])


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"embedding": [1, 2, 3, 4, "x"]}\n', r'line 1: field \'embedding\' holds "x" at position 4'),
        (b'{"other": 1}\n', "line 1"),
        (b'{"embedding": [1, 2, 3, 4, 5]}\nnot json\n', "line 2"),
    ],
    ids=["string", "missing-field", "bad-json"],
)
def test_jsonl_errors_name_the_line(body, needle):
    with pytest.raises(InputDataError, match=needle):
        _read_all("jsonl", body)


# ---------------------------------------------------------------- safetensors


def test_safetensors_reader_picks_the_only_2d_float_tensor():
    x = RNG.standard_normal((4, 5)).astype(np.float32)
    data = st_save({"ids": np.arange(4, dtype=np.int64), "emb": x})
    got, _ = _read_all("safetensors", data)
    np.testing.assert_array_equal(got, x)


def test_safetensors_writer_keeps_other_tensors_and_metadata():
    x = RNG.standard_normal((4, 5)).astype(np.float32)
    ids = np.arange(4, dtype=np.int64)
    data = st_save({"ids": ids, "emb": x}, metadata={"source": "test"})
    out = st_load(_filter("safetensors", data, "safetensors"))
    np.testing.assert_array_equal(out["ids"], ids)
    assert out["emb"].dtype == np.float32
    np.testing.assert_allclose(out["emb"], x.astype(np.float64) @ P.T, rtol=1e-5)


def test_safetensors_choice_of_tensor():
    a = RNG.standard_normal((2, 5)).astype(np.float32)
    b = RNG.standard_normal((2, 5)).astype(np.float32)
    data = st_save({"a": a, "b": b})
    with pytest.raises(InputDataError, match="--tensor"):
        _read_all("safetensors", data)
    got, _ = _read_all("safetensors", data, tensor="b")
    np.testing.assert_array_equal(got, b)


def test_safetensors_passthrough_items_carry_the_other_tensors_bytes():
    ids = np.arange(4, dtype=np.int64)
    data = st_save({"ids": ids, "emb": RNG.standard_normal((4, 5)).astype(np.float32)})
    source = registry.open_source(io.BytesIO(data), "safetensors", "in", expected_dim=5)
    chunks = [i for i in source.items(2, passthrough=True) if isinstance(i, Passthrough)]
    assert {c.name for c in chunks} == {"ids"}
    assert b"".join(c.data for c in chunks) == ids.tobytes()


# ---------------------------------------------------------------- dtypes


def test_bfloat16_conversions_match_torch():
    values = np.concatenate(
        [RNG.standard_normal(1000).astype(np.float32) * 100, [0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38]]
    ).astype(np.float32)
    ref_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16(values), ref_bits)
    widened = torch.from_numpy(ref_bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bfloat16_to_float32(ref_bits), widened)
    assert np.isnan(bfloat16_to_float32(float32_to_bfloat16(np.array([np.nan], np.float32)))).all()
