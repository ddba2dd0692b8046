"""Hostile checkpoints: every malformed model file gives one `Error:` line and reads nothing outside
the model folder; the Hugging Face cache layout (links to suffix-less blobs) works."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import EmbfilterError
from tests.hostile._util import Snapshot, expect_error, gguf_bytes, head_file, safetensors_bytes


def fit(runner, model: Path | str, out: Path, *extra: str):
    return runner.invoke(app, ["fit", "-q", "--model", str(model), "--rank", "1", "-o", str(out), *extra])


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("existing output folder content")
    return tmp_path


def refused(runner, model, work: Path, match: str | None = None, status: int = 1) -> str:
    before = Snapshot(work / "out")
    line = expect_error(fit(runner, model, work / "out" / "f.safetensors"), status, match)
    before.assert_unchanged()
    return line


# --------------------------------------------------------------------------- confinement


def _sharded_folder(folder: Path, shard_name: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    head_file(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard_name}}))
    return folder


@pytest.mark.parametrize("escape", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS", "a\\b", ""])
def test_index_naming_a_file_outside_the_folder_is_refused(runner, work, escape):
    outside = head_file(work / "outside.safetensors", seed=7)  # a perfectly readable file, outside
    name = str(outside) if escape == "ABS" else escape
    folder = _sharded_folder(work / "model", name)
    line = refused(runner, folder, work)
    assert "outside the model folder" in line or "not a file name" in line
    # The refusal never quotes the outside file's bytes.
    assert outside.read_bytes()[:8].decode("latin-1") not in line


def test_index_inside_the_folder_still_works(runner, work):
    folder = _sharded_folder(work / "model", "model-00001-of-00001.safetensors")
    result = fit(runner, folder, work / "out" / "f.safetensors")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("weight_map", [[], "x", None, 3, {"lm_head.weight": 5}, {"lm_head.weight": ["a"]}])
def test_weight_map_of_the_wrong_type(runner, work, weight_map):
    folder = _sharded_folder(work / "model", "x")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(runner, folder, work)


# --------------------------------------------------------------------------- Hugging Face cache layout


def _hf_cache(root: Path, blob_bytes: bytes, name: str) -> Path:
    blobs = root / "models--org--m" / "blobs"
    snap = root / "models--org--m" / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "0123abcd").write_bytes(blob_bytes)
    os.symlink(Path("..") / ".." / "blobs" / "0123abcd", snap / name)
    return snap / name


def test_hf_cache_safetensors_link_to_suffixless_blob_works(runner, work, tmp_path):
    src = head_file(tmp_path / "src.safetensors")
    link = _hf_cache(tmp_path / "cache", src.read_bytes(), "model.safetensors")
    result = fit(runner, link, work / "out" / "f.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    # the same filter as from the plain file
    plain = fit(runner, src, work / "out" / "g.safetensors", "--json")
    assert json.loads(result.stdout)["unembedding_sha256"] == json.loads(plain.stdout)["unembedding_sha256"]
    # and the snapshot folder itself (a folder of links) works too
    assert fit(runner, link.parent, work / "out" / "h.safetensors").exit_code == 0


def test_hf_cache_gguf_link_to_suffixless_blob_works(runner, work, tmp_path):
    from tests.tiny_models import make_gguf

    src = make_gguf(tmp_path / "src.gguf")[0]
    link = _hf_cache(tmp_path / "cache", src.read_bytes(), "model-Q8_0.gguf")
    result = fit(runner, link, work / "out" / "f.safetensors")
    assert result.exit_code == 0, result.stderr


def test_suffixless_file_is_judged_by_its_bytes(runner, work, tmp_path):
    raw = head_file(tmp_path / "src.safetensors").read_bytes()
    (tmp_path / "weights").write_bytes(raw)
    assert fit(runner, tmp_path / "weights", work / "g.safetensors").exit_code == 0
    (tmp_path / "notes").write_text("hello")
    refused(runner, tmp_path / "notes", work, "suffix-less")


def test_fifo_and_directory_named_like_weights_are_refused_without_blocking(runner, work, tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    refused(runner, tmp_path / "model.safetensors", work, "not a regular file")
    folder = tmp_path / "m"
    (folder / "model.safetensors").mkdir(parents=True)
    refused(runner, folder, work, "directory")


# --------------------------------------------------------------------------- config / tokenizer


@pytest.mark.parametrize(
    "config", ["[1, 2]", "null", '"text"', '{"text_config": [1]}', '{"tie_word_embeddings": "yes"}', "{", "\xff"]
)
def test_malformed_config_json(runner, work, config):
    folder = work / "model"
    folder.mkdir()
    head_file(folder / "model.safetensors")
    (folder / "config.json").write_bytes(config.encode("latin-1"))
    refused(runner, folder, work, "config.json")


@pytest.mark.parametrize(
    "tokenizer",
    [
        "not json",
        "[]",
        '{"model": {"vocab": {"a": "zero"}}}',
        '{"model": {"vocab": {"a": -1}}}',
        '{"model": {"vocab": {"a": 1.5}}}',
        '{"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": "x"}]}',
        '{"model": {"vocab": {"a": 0}}, "added_tokens": 7}',
    ],
)
def test_malformed_tokenizer_json(runner, work, tokenizer):
    folder = work / "model"
    folder.mkdir()
    head_file(folder / "model.safetensors")
    (folder / "tokenizer.json").write_text(tokenizer)
    refused(runner, folder, work, "tokenizer.json")


def test_deeply_nested_json_is_an_error_not_a_recursion_crash(runner, work):
    folder = work / "model"
    folder.mkdir()
    head_file(folder / "model.safetensors")
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    refused(runner, folder, work, "config.json")


# --------------------------------------------------------------------------- safetensors headers

_GOOD = {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"lm_head.weight": [1]},
        {"lm_head.weight": {"dtype": "F32", "shape": [4, 2]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [-4, -2], "data_offsets": [0, 32]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [4.0, 2], "data_offsets": [0, 32]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 0]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": ["0", "32"]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32, 64]}},
        {"lm_head.weight": {"dtype": 5, "shape": [4, 2], "data_offsets": [0, 32]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 32]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 10**30]}},
        {"lm_head.weight": _GOOD, "__metadata__": [1]},
        {"lm_head.weight": _GOOD, "__metadata__": {"a": 1}},
        {"lm_head.weight": {"dtype": "F32", "shape": [0, 2], "data_offsets": [0, 0]}},
        {"lm_head.weight": {"dtype": "F32", "shape": [4, 0], "data_offsets": [0, 0]}},
    ],
)
def test_malformed_safetensors_headers(runner, work, tmp_path, header):
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 32))
    refused(runner, path, work)


@pytest.mark.parametrize("length", [0, 2**63, 2**64 - 1, 1000])
def test_safetensors_header_length_out_of_range(runner, work, tmp_path, length):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}" + b"\0" * 30)
    refused(runner, path, work)


def test_safetensors_reader_property(tmp_path):
    """Over arbitrary header JSON the shared reader returns checked entries or raises its one error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from embfilter_cli.safetensors_header import ITEMSIZE, SafetensorsHeaderError, read_header

    ints = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3))
    values = st.one_of(st.none(), ints, st.lists(ints, max_size=4), st.dictionaries(st.text(max_size=3), ints))
    entry = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.one_of(st.sampled_from(sorted(ITEMSIZE)), values),
            "shape": st.one_of(st.lists(st.integers(-3, 2**33), max_size=3), values),
            "data_offsets": st.one_of(st.lists(st.integers(-5, 2**34), min_size=2, max_size=2), values),
        },
    )
    header = st.one_of(
        st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), st.one_of(entry, values), max_size=3), values
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(header=header, data_size=st.one_of(st.none(), st.integers(0, 2**35)))
    def check(header, data_size):
        raw = safetensors_bytes(header)
        try:
            parsed = read_header(io.BytesIO(raw), data_size=data_size)
        except SafetensorsHeaderError:
            return
        metadata, entries = parsed.metadata, parsed.entries
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        previous_end = 0
        for e in entries:
            assert all(isinstance(s, int) and s >= 0 for s in e.shape)
            assert 0 <= e.begin <= e.end and (data_size is None or e.end <= data_size)
            if e.dtype in ITEMSIZE:
                assert e.end - e.begin == int(np.prod(e.shape, dtype=object)) * ITEMSIZE[e.dtype]
            assert e.begin >= previous_end or e.begin == e.end
            previous_end = max(previous_end, e.end)

    check()


# --------------------------------------------------------------------------- GGUF

_F32 = 0
_U32 = 4


def _gguf_head(rows: int = 4, cols: int = 8, **kw) -> bytes:
    data = np.ones((rows, cols), dtype=np.float32).tobytes()
    return gguf_bytes(tensors=[("output.weight", [cols, rows], _F32, 0)], data=data, **kw)


def test_small_gguf_fixture_is_readable(runner, work, tmp_path):
    (tmp_path / "m.gguf").write_bytes(_gguf_head())
    assert fit(runner, tmp_path / "m.gguf", work / "out" / "f.safetensors").exit_code == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"GGUF",
        gguf_bytes(kvs=[("general.alignment", _U32, struct.pack("<I", 0))], tensors=[("output.weight", [8, 4], 0, 0)]),
        gguf_bytes(kvs=[("general.alignment", _U32, struct.pack("<I", 3))], tensors=[("output.weight", [8, 4], 0, 0)]),
        _gguf_head(rows=4, cols=0),
        _gguf_head(rows=0, cols=8),
        _gguf_head(counts=(2**63, 2**63)),
        _gguf_head(counts=(1, 2**40)),
        gguf_bytes(tensors=[("output.weight", [8] * 9, 0, 0)]),
        gguf_bytes(tensors=[("output.weight", [8, 4], 0, 2**60)]),
        gguf_bytes(kvs=[("k", 9, struct.pack("<IQ", 4, 2**62))]),
        gguf_bytes(kvs=[("k", 8, struct.pack("<Q", 2**62))]),
    ],
    ids=[
        "empty",
        "magic-only",
        "align0",
        "align3",
        "zero-cols",
        "zero-rows",
        "counts",
        "kv",
        "dims",
        "offset",
        "array",
        "str",
    ],
)
def test_malformed_gguf(runner, work, tmp_path, raw):
    (tmp_path / "m.gguf").write_bytes(raw)
    refused(runner, tmp_path / "m.gguf", work)


def test_gguf_header_property(tmp_path):
    """Over random header fields the walker returns a header or raises EmbfilterError / UnsupportedGGUF."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from embfilter_cli.model.gguf_header import UnsupportedGGUF, read_header

    u64 = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1))
    path = tmp_path / "h.gguf"

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        n_t=u64,
        n_kv=u64,
        vtype=st.integers(0, 14),
        value=st.binary(max_size=24),
        n_dims=st.integers(0, 2**32 - 1),
        dims=st.lists(st.integers(0, 2**64 - 1), max_size=3),
        offset=u64,
        tail=st.binary(max_size=16),
    )
    def check(n_t, n_kv, vtype, value, n_dims, dims, offset, tail):
        raw = b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv)
        raw += struct.pack("<Q", 1) + b"k" + struct.pack("<I", vtype) + value
        raw += struct.pack("<Q", 1) + b"t" + struct.pack("<I", n_dims) + b"".join(struct.pack("<Q", d) for d in dims)
        raw += struct.pack("<IQ", 0, offset % 2**64) + tail
        path.write_bytes(raw)
        try:
            header = read_header(path)
        except (EmbfilterError, UnsupportedGGUF):
            return
        for info in header.tensors.values():
            assert len(info.shape) <= 4 and info.offset <= len(raw)

    check()


# --------------------------------------------------------------------------- .bin


def test_pickle_is_never_executed(runner, work, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"lm_head.weight": Evil()}, fh)
    refused(runner, tmp_path / "pytorch_model.bin", work)
    assert not marker.exists()
