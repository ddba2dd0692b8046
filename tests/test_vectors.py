"""Unit tests of the vector format registry: every registered format round-trips through its own Source and Sink."""

from __future__ import annotations

import io

import numpy as np
import pytest

from embfilter_cli.vectors import detect, registry, stream
from embfilter_cli.vectors.base import Batch, SinkOptions


def _write(fmt: str, x: np.ndarray, p: np.ndarray) -> bytes:
    """x through P with the format's sink on a pipe-like (non-seekable) stream."""
    src_buf = io.BytesIO()
    np.save(src_buf, x)
    src_buf.seek(0)
    source = registry.open_source(src_buf, "npy", "x", expected_dim=x.shape[1])
    out = io.BytesIO()
    sink = registry.open_sink(out, fmt, SinkOptions(seekable=False, source=source, metadata={"k": "v"}))
    stats = stream.filter_stream(source, sink, p, batch_rows=3)
    assert stats.rows == len(x)
    return out.getvalue()


@pytest.mark.parametrize("fmt", registry.FORMATS)
def test_every_registered_format_round_trips(fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5))  # float64, so JSONL (float64 by nature) is exact too
    p = rng.standard_normal((3, 5))
    data = _write(fmt, x, p)
    assert detect.sniff_format(data[:16]) == fmt
    source = registry.open_source(io.BytesIO(data), fmt, "y", expected_dim=3)
    # a batch is only valid until the next one (buffers are reused on streams): copy each
    got = np.concatenate([b.vectors.copy() for b in source.items(4) if isinstance(b, Batch)])
    np.testing.assert_allclose(got, x @ p.T, rtol=1e-12, atol=1e-12)  # float64 throughout, JSONL round-trips exactly
    assert source.dtype == "float64" and source.rows in (None, 7)
    if fmt == "safetensors":  # the only built-in format that stores string metadata
        assert source.metadata == {"k": "v"}


def test_registry_lists_each_extension_once_and_detection_uses_it():
    assert set(registry.EXTENSIONS.values()) == set(registry.FORMATS)
    for ext, fmt in registry.EXTENSIONS.items():
        assert detect.format_from_path(f"a/b{ext.upper()}") == fmt
    assert detect.format_from_path("b.txt") is None
    with pytest.raises(ValueError, match="unknown vector format 'parquet'"):
        registry.get_format("parquet")


def test_a_safetensors_header_that_starts_with_a_brace_is_not_taken_for_jsonl():
    head = (123).to_bytes(8, "little") + b"{" + b"\x00" * 7  # header length 123 = the byte "{"
    assert head[:1] == b"{" and detect.sniff_format(head) == "safetensors"
