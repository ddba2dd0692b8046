"""A fast, read-only walk of a GGUF file's header: chosen key/values and the tensor table.

`gguf.GGUFReader` builds numpy views for every key, every string of every array (a 49k-token
vocabulary plus its merges) and every tensor before returning, which takes seconds; embfilter
needs one tensor and a few keys. This walks the little-endian v2/v3 layout with `struct`:

    magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
    kv_count × (string key, u32 type, value),
    tensor_count × (string name, u32 n_dims, n_dims × u64 dims, u32 ggml_type, u64 offset),
    padding to `general.alignment` (default 32), then the tensor data.

The standard keys that embfilter or transformers' GGUF loader reads (`KEY_TYPES`, `ARCH_KEY_TYPES`:
the architecture, tokenizer lists, sizes) must have their GGUF value type — a string, an array of
strings, of integers or of floats, a positive integer — whether or not the caller asked for them,
and `tokenizer.ggml.token_type`/`scores` must have one entry per token: a file that breaks this is
`CorruptGGUF` ("tokenizer.ggml.token_type is a string, expected an array of integers"), so no reader
after this one (tokens, unembedding, the transformers conversion) sees a wrongly typed value.

Not handled (callers fall back to GGUFReader, signalled by `UnsupportedGGUF`): big-endian and v1
files, nested arrays, value types this walker does not know. A file that is corrupt rather than
unusual (too short, counts or strings past its end, an alignment that is not a power of two, more
than 4 dimensions, tensor data past the end) raises `CorruptGGUF`, an EmbfilterError: no fallback
reader is tried on it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embfilter_cli.errors import ModelNotFoundError

# GGUF value type -> byte size, for the fixed-size scalar types.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class UnsupportedGGUF(Exception):
    """The file uses a layout this walker does not read; use gguf.GGUFReader instead."""


class CorruptGGUF(ModelNotFoundError):
    """The file claims to be GGUF but its header is inconsistent; one line for the user."""


_INTEGER = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_FLOAT = frozenset({6, 12})
_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 10: "u64", 11: "i64"}
_TYPE_NAMES |= {12: "f64", _STRING: "string", _ARRAY: "array"}

# Expected kinds: "string", "count" (an integer > 0), "id" (an integer >= 0), "float", and
# "strings"/"integers"/"floats" (arrays); "count|integers" accepts either (per-layer counts).
KEY_TYPES: dict[str, str] = {
    "general.architecture": "string",
    "general.alignment": "count",
    "tokenizer.ggml.model": "string",
    "tokenizer.ggml.pre": "string",
    "tokenizer.ggml.tokens": "strings",
    "tokenizer.ggml.merges": "strings",
    "tokenizer.ggml.token_type": "integers",
    "tokenizer.ggml.scores": "floats",
    "tokenizer.ggml.bos_token_id": "id",
    "tokenizer.ggml.eos_token_id": "id",
    "tokenizer.ggml.unknown_token_id": "id",
    "tokenizer.ggml.padding_token_id": "id",
}
# `<architecture>.<suffix>` keys (e.g. llama.embedding_length).
ARCH_KEY_TYPES: dict[str, str] = {
    "embedding_length": "count",
    "block_count": "count",
    "context_length": "count",
    "vocab_size": "count",
    "feed_forward_length": "count|integers",
    "attention.head_count": "count|integers",
    "attention.head_count_kv": "count|integers",
    "attention.layer_norm_rms_epsilon": "float",
    "rope.freq_base": "float",
}
_DESCRIBE = {
    "string": "a string",
    "count": "a positive integer",
    "id": "a non-negative integer",
    "float": "a number",
    "strings": "an array of strings",
    "integers": "an array of integers",
    "floats": "an array of numbers",
    "count|integers": "a positive integer or an array of integers",
}
_PER_TOKEN = ("tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def expected_kind(key: str) -> str | None:
    """The kind of value a standard key must hold (see KEY_TYPES), or None for any other key."""
    if key in KEY_TYPES:
        return KEY_TYPES[key]
    prefix, _, suffix = key.partition(".")
    return ARCH_KEY_TYPES.get(suffix) if prefix not in ("general", "tokenizer") else None


def _check_kind(key: str, kind: str, vtype: int, itype: int | None, value: object) -> None:
    """Raise CorruptGGUF unless a value of GGUF type `vtype` (array items: `itype`) is of `kind`."""
    wants = kind.split("|")
    if itype is not None:  # an array
        got = (
            "strings" if itype == _STRING else "integers" if itype in _INTEGER else "floats" if itype in _FLOAT else ""
        )
        ok = got in wants or (got == "integers" and "floats" in wants)
        found = f"a GGUF array of {_TYPE_NAMES.get(itype, f'type {itype}')}"
    elif vtype in _INTEGER:
        number = int(value)  # type: ignore[call-overload]
        ok = ("count" in wants and number > 0) or ("id" in wants and number >= 0) or "float" in wants
        found = str(number) if {"count", "id"} & set(wants) else f"a GGUF {_TYPE_NAMES[vtype]}"
    else:
        ok = ("string" in wants) if vtype == _STRING else (vtype in _FLOAT and "float" in wants)
        found = f"a GGUF {_TYPE_NAMES.get(vtype, f'value of type {vtype}')}"
    if not ok:
        raise CorruptGGUF(f"{key} is {found}, expected {_DESCRIBE[kind]}")


_MAX_DIMS = 4  # GGML_MAX_DIMS
_MIN_KV_BYTES = 8 + 4  # empty key + value type
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # empty name + n_dims + type + offset


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first): GGUF lists dims fastest first
    ggml_type: int
    offset: int  # absolute byte offset in the file


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, object] = field(default_factory=dict)  # the wanted keys only
    array_lengths: dict[str, int] = field(default_factory=dict)  # every array key -> element count
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)


def read_header(path: Path, wanted: frozenset[str] = frozenset(), tensors: bool = True) -> GGUFHeader:
    """Read the header; with tensors=False, stop as soon as every wanted key was seen."""
    size = path.stat().st_size
    if size < 24:
        raise CorruptGGUF(f"{path} is {size} bytes, too short to be a GGUF file; re-download it")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _walk(buf, wanted, tensors)
        except CorruptGGUF as exc:
            raise CorruptGGUF(f"{path} has a corrupt GGUF header ({exc}); re-download it") from None
        except (struct.error, IndexError, OverflowError, MemoryError) as exc:
            raise CorruptGGUF(
                f"{path} has a corrupt GGUF header (it runs past the end: {exc}); re-download it"
            ) from None


def check_file(path: Path) -> None:
    """Walk the whole header of `path`, so a corrupt or wrongly typed one fails before transformers reads it.

    Layouts this walker does not read (big-endian, v1) pass unchecked: their reader checks them.

    Raises:
        CorruptGGUF: see `read_header`.
    """
    try:
        read_header(path)
    except UnsupportedGGUF:
        pass


def check_reader_fields(reader: Any, path: Path) -> None:
    """The same type and length checks for a `gguf.GGUFReader` (the fallback for big-endian and v1 files).

    Raises:
        CorruptGGUF: a standard key has the wrong type, or token_type/scores the wrong length.
    """
    header = GGUFHeader(0)
    try:
        for key, fld in reader.fields.items():
            types = [int(t) for t in fld.types]
            if types and types[0] == _ARRAY:
                header.array_lengths[key] = len(fld.data)
            kind = expected_kind(key)
            if kind is None or not types:
                continue
            itype = (types[1] if len(types) > 1 else -1) if types[0] == _ARRAY else None
            if len(types) > 2:
                itype = _ARRAY  # an array of arrays
            value = fld.parts[fld.data[0]][0] if types[0] in _INTEGER and fld.data else 0
            _check_kind(key, kind, types[0], itype, value)
        _check_per_token(header)
    except CorruptGGUF as exc:
        raise CorruptGGUF(f"{path} has a corrupt GGUF header ({exc}); re-download it") from None


def _check_per_token(header: GGUFHeader) -> None:
    """token_type and scores, where present, have exactly one entry per token."""
    tokens = header.array_lengths.get("tokenizer.ggml.tokens")
    for key in _PER_TOKEN:
        count = header.array_lengths.get(key)
        if tokens is not None and count is not None and count != tokens:
            raise CorruptGGUF(f"{key} has {count} entries but tokenizer.ggml.tokens has {tokens}")


def _walk(buf: mmap.mmap, wanted: frozenset[str], tensors: bool) -> GGUFHeader:
    if buf[:4] != b"GGUF":
        raise UnsupportedGGUF("no GGUF magic")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        raise UnsupportedGGUF(f"version {version}")
    tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    if kv_count * _MIN_KV_BYTES > len(buf) or tensor_count * _MIN_TENSOR_BYTES > len(buf):
        raise CorruptGGUF(f"it claims {tensor_count} tensors and {kv_count} keys, more than the file can hold")
    header = GGUFHeader(version)
    pos = 24

    def read_str(at: int) -> tuple[bytes, int]:
        (length,) = struct.unpack_from("<Q", buf, at)
        end = at + 8 + length
        if end > len(buf):
            raise CorruptGGUF("a string runs past the end of the file")
        return buf[at + 8 : end], end

    alignment = 32
    for _ in range(kv_count):
        raw_key, pos = read_str(pos)
        key = raw_key.decode("utf-8", errors="replace")
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        kind = expected_kind(key)
        if vtype == _STRING:
            value, pos = read_str(pos)
            if kind is not None:
                _check_kind(key, kind, vtype, None, None)
            if key in wanted:
                header.fields[key] = value.decode("utf-8", errors="replace")
        elif vtype == _ARRAY:
            itype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if kind is not None:
                _check_kind(key, kind, vtype, itype, None)
            if count > len(buf) - pos:
                raise CorruptGGUF(f"array {key!r} claims {count} items, more than the file can hold")
            header.array_lengths[key] = count
            if itype == _STRING:
                items = []
                for _ in range(count):
                    item, pos = read_str(pos)
                    if key in wanted:
                        items.append(item.decode("utf-8", errors="replace"))
                if key in wanted:
                    header.fields[key] = items
            elif itype in _FIXED:
                size = _FIXED[itype] * count
                if pos + size > len(buf):
                    raise CorruptGGUF(f"array {key!r} runs past the end of the file")
                if key in wanted:
                    import numpy as np

                    header.fields[key] = np.frombuffer(buf[pos : pos + size], dtype=_INT_FORMATS[itype])
                pos += size
            else:
                raise UnsupportedGGUF(f"nested array under {key}")
        elif vtype in _FIXED:
            if key in wanted or kind is not None:
                (value,) = struct.unpack_from(_INT_FORMATS[vtype], buf, pos)
                if kind is not None:
                    _check_kind(key, kind, vtype, None, value)
                if key == "general.alignment":
                    alignment = int(value)
                    if alignment <= 0 or alignment & (alignment - 1):
                        raise CorruptGGUF(f"general.alignment is {alignment}, not a positive power of two")
                if key in wanted:
                    header.fields[key] = value
            pos += _FIXED[vtype]
        else:
            raise UnsupportedGGUF(f"value type {vtype} under {key}")
        if not tensors and wanted and all(k in header.fields for k in wanted):
            _check_per_token(header)
            return header
    _check_per_token(header)
    if not tensors:
        return header
    infos = []
    for _ in range(tensor_count):
        raw_name, pos = read_str(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if n_dims > _MAX_DIMS:
            raise CorruptGGUF(f"tensor {raw_name[:64]!r} claims {n_dims} dimensions (GGUF allows {_MAX_DIMS})")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        infos.append(
            (raw_name.decode("utf-8", errors="replace"), tuple(int(d) for d in reversed(dims)), ggml_type, offset)
        )
    data_start = pos + (-pos % alignment)
    for name, shape, ggml_type, offset in infos:
        if data_start + offset > len(buf):
            raise CorruptGGUF(f"tensor {name!r} starts past the end of the file")
        header.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, data_start + offset)
    return header
