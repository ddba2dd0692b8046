"""`gguf_header`: the struct walk of a GGUF header agrees with gguf's own reader; odd files are refused."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from embfilter_cli.model.gguf_header import CorruptGGUF, UnsupportedGGUF, read_header
from tests.tiny_models import make_gguf


def _write(path: Path, alignment: int | None = None) -> Path:
    writer = GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(3)
    writer.add_embedding_length(8)
    writer.add_string("general.name", "tiny")
    writer.add_float32("test.scale", 0.5)
    writer.add_token_list(["a", "bé", "c"])
    writer.add_token_types([1, 3, 6])
    writer.add_tensor("output.weight", np.arange(24, dtype=np.float32).reshape(3, 8))
    writer.add_tensor("norm.weight", np.ones(8, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


WANTED = frozenset(
    {"general.name", "llama.block_count", "test.scale", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"}
)


@pytest.mark.parametrize("alignment", [None, 64])
def test_fields_and_tensor_table_match_gguf_reader(tmp_path, alignment):
    path = _write(tmp_path / "m.gguf", alignment)
    header = read_header(path, WANTED)
    assert header.version == 3
    assert header.fields["general.name"] == "tiny"
    assert header.fields["llama.block_count"] == 3
    assert header.fields["test.scale"] == 0.5
    assert header.fields["tokenizer.ggml.tokens"] == ["a", "bé", "c"]
    np.testing.assert_array_equal(header.fields["tokenizer.ggml.token_type"], [1, 3, 6])
    assert header.array_lengths == {"tokenizer.ggml.tokens": 3, "tokenizer.ggml.token_type": 3}
    assert "llama.embedding_length" not in header.fields  # only wanted keys are decoded

    reader = GGUFReader(str(path))
    assert set(header.tensors) == {t.name for t in reader.tensors}
    for ref in reader.tensors:
        info = header.tensors[ref.name]
        assert info.shape == tuple(int(d) for d in reversed(ref.shape.tolist()))  # numpy order
        assert info.ggml_type == int(ref.tensor_type)
        assert info.offset == ref.data_offset
    raw = path.read_bytes()
    out = header.tensors["output.weight"]
    np.testing.assert_array_equal(
        np.frombuffer(raw, np.float32, count=24, offset=out.offset).reshape(out.shape),
        np.arange(24, dtype=np.float32).reshape(3, 8),
    )


def test_quantized_head_offsets_match_gguf_reader(tmp_path):
    path, _ = make_gguf(tmp_path / "q.gguf", rows=64, hidden=32, head="f16")
    header = read_header(path)
    for ref in GGUFReader(str(path)).tensors:
        assert header.tensors[ref.name].offset == ref.data_offset
        assert header.tensors[ref.name].ggml_type == int(ref.tensor_type)


def test_without_tensors_it_stops_once_the_wanted_keys_are_seen(tmp_path):
    path = _write(tmp_path / "m.gguf")
    header = read_header(path, frozenset({"general.name"}), tensors=False)
    assert header.fields == {"general.name": "tiny"} and header.tensors == {}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b"XXXX" + b[4:], "no GGUF magic"),
        (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "version 1"),
    ],
    ids=["magic", "version"],
)
def test_unsupported_layouts_raise_unsupported_gguf(tmp_path, mutate, needle):
    """Layouts this walker does not read: the caller falls back to gguf.GGUFReader."""
    good = _write(tmp_path / "m.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(good))
    with pytest.raises(UnsupportedGGUF, match=needle):
        read_header(bad, WANTED)


@pytest.mark.parametrize("keep", [10, 40, 200])
def test_truncated_files_raise_corrupt_gguf_naming_the_file(tmp_path, keep):
    good = _write(tmp_path / "m.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:keep])
    with pytest.raises(CorruptGGUF, match=r"bad\.gguf .*re-download it"):
        read_header(bad, WANTED)
