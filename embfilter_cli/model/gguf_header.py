"""A fast, read-only walk of a GGUF file's header: chosen key/values and the tensor table.

`gguf.GGUFReader` builds numpy views for every key, every string of every array (a 49k-token
vocabulary plus its merges) and every tensor before returning, which takes seconds; embfilter
needs one tensor and a few keys. This walks the little-endian v2/v3 layout with `struct`:

    magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
    kv_count × (string key, u32 type, value),
    tensor_count × (string name, u32 n_dims, n_dims × u64 dims, u32 ggml_type, u64 offset),
    padding to `general.alignment` (default 32), then the tensor data.

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

from embfilter_cli.errors import ModelNotFoundError

# GGUF value type -> byte size, for the fixed-size scalar types.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class UnsupportedGGUF(Exception):
    """The file uses a layout this walker does not read; use gguf.GGUFReader instead."""


class CorruptGGUF(ModelNotFoundError):
    """The file claims to be GGUF but its header is inconsistent; one line for the user."""


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
        if vtype == _STRING:
            value, pos = read_str(pos)
            if key in wanted:
                header.fields[key] = value.decode("utf-8", errors="replace")
        elif vtype == _ARRAY:
            itype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
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
            if key in wanted or key == "general.alignment":
                (value,) = struct.unpack_from(_INT_FORMATS[vtype], buf, pos)
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
            return header
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
