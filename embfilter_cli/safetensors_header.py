"""The one safetensors header parser: 8-byte length, JSON header, tensor table.

Layout (https://github.com/huggingface/safetensors): a little-endian u64 N, N bytes of UTF-8 JSON
mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative
to the data section that starts at byte 8 + N) plus an optional `__metadata__` str→str map.

Both the model reader (`model/unembedding.py`, W_U straight from a checkpoint) and the vector
streams (`vectors/`, safetensors in and out) read headers, but they word their errors for
different users ("re-download the model" vs "recreate the file"). So this module raises one
`SafetensorsHeaderError` whose `problem` says what was wrong and carries the facts; each caller
turns it into its own `EmbfilterError`.

This is a base-layer module (next to `errors` and `files`): it imports only the standard library.

Not handled: reading tensor data (callers memory-map or stream it), writing headers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, Literal

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
MAX_ELEMENTS = 1 << 48  # far beyond any real tensor: a header claiming more is corrupt, not big

# Every dtype tag of the safetensors format and its item size in bytes.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

Problem = Literal["short", "length", "json", "metadata", "entry", "range", "overlap", "truncated"]


class SafetensorsHeaderError(Exception):
    """The bytes are not a readable safetensors header; callers reword it as an `EmbfilterError`.

    Attributes:
        problem: "short" (fewer than 8 bytes), "length" (the u64 is 0 or over the limit),
            "json" (the header is not a UTF-8 JSON object), "metadata" (`__metadata__` is not an
            object of strings), "entry" (a tensor entry is not an object with a string dtype, a
            shape of non-negative integers and data_offsets of two integers 0 <= begin <= end, or
            claims more than MAX_ELEMENTS elements), "range" (a tensor's byte range does not fit
            its dtype and shape), "overlap" (two tensors share bytes), "truncated" (a tensor ends
            past the end of the data section, when the caller knows its size).
        length: bytes read for "short", else the header length the first 8 bytes give.
        names: the tensor(s) concerned ("entry", "range", "overlap").
        entry: the offending entry ("range").
        cause: the JSON parser's message ("json"), when there was one.
    """

    def __init__(
        self,
        problem: Problem,
        length: int,
        names: tuple[str, ...] = (),
        entry: TensorEntry | None = None,
        cause: str = "",
    ) -> None:
        super().__init__(f"safetensors header: {problem} ({length} bytes{'; ' + cause if cause else ''})")
        self.problem: Problem = problem
        self.length = length
        self.names = names
        self.entry = entry
        self.cause = cause


@dataclass
class TensorEntry:
    """One tensor of a safetensors header."""

    name: str
    dtype: str  # safetensors tag, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int


@dataclass
class SafetensorsHeader:
    """A parsed header: metadata, tensors sorted by their position in the data section."""

    metadata: dict[str, str]
    entries: list[TensorEntry]
    data_start: int  # absolute offset of the data section (8 + header length)

    def by_name(self) -> dict[str, TensorEntry]:
        """Tensor name → entry."""
        return {e.name: e for e in self.entries}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(key: str, value: object) -> TensorEntry | None:
    """A checked entry, or None when any field has the wrong JSON type or an impossible value."""
    if not isinstance(value, dict):
        return None
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if not all(_is_int(s) and s >= 0 for s in shape) or math.prod(shape) > MAX_ELEMENTS:
        return None
    if len(offsets) != 2 or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
        return None
    return TensorEntry(key, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(
    fp: IO[bytes],
    max_length: int = MAX_HEADER_BYTES,
    itemsizes: Mapping[str, int] | None = ITEMSIZE,
    data_size: int | None = None,
) -> SafetensorsHeader:
    """Parse the header at the stream's current position (its start); leaves it at the data section.

    Args:
        fp: a binary stream (a file or a pipe: only `read` is used).
        max_length: the largest header length accepted (callers that know the file size pass
            `min(size - 8, MAX_HEADER_BYTES)`).
        itemsizes: dtype tag → item size; every entry must then have a known dtype, a byte range
            of exactly prod(shape) × itemsize, and no overlap with another. None skips these
            checks (a model reader that only needs one tensor must not fail on exotic dtypes of
            the others; it checks its own tensor). The JSON types and signs of every field are
            checked either way.
        data_size: bytes after the header, when known (a file): no tensor may end past it.

    Raises:
        SafetensorsHeaderError: see its `problem` attribute.
    """
    head = fp.read(8)
    if len(head) < 8:
        raise SafetensorsHeaderError("short", len(head))
    n = int.from_bytes(head, "little")
    if not 0 < n <= max_length:
        raise SafetensorsHeaderError("length", n)
    raw = fp.read(n)
    header: Any = None
    cause = f"the stream ended after {len(raw)} of {n} header bytes" if len(raw) != n else ""
    if not cause:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            cause = str(exc)
        except RecursionError:
            cause = "JSON nested too deeply"
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("json", n, cause=cause or "not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsHeaderError("metadata", n)
    entries = []
    for key, value in header.items():
        entry = _entry(str(key), value)
        if entry is None:
            raise SafetensorsHeaderError("entry", n, names=(str(key),))
        if itemsizes is not None:
            itemsize = itemsizes.get(entry.dtype)
            if itemsize is None or entry.end - entry.begin != math.prod(entry.shape) * itemsize:
                raise SafetensorsHeaderError("range", n, names=(entry.name,), entry=entry)
        if data_size is not None and entry.end > data_size:
            raise SafetensorsHeaderError("truncated", n, names=(entry.name,), entry=entry)
        entries.append(entry)
    entries.sort(key=lambda e: (e.begin, e.end))
    if itemsizes is not None:
        for before, after in itertools.pairwise(entries):
            if after.begin < before.end:
                raise SafetensorsHeaderError("overlap", n, names=(before.name, after.name))
    meta = dict(metadata)
    return SafetensorsHeader(meta, entries, 8 + n)


def sort_header(path: str | os.PathLike[str]) -> None:
    """Rewrite a safetensors header with sorted keys, so equal artifacts are equal bytes.

    The writer emits the metadata in hash-map order, which changes from run to run. The sorted
    JSON has the same length (same entries, same compact separators); should it ever be longer,
    the file is left as written (still valid, only not canonical).
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = handle.read(size)
        canonical = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= size:
            handle.seek(8)
            handle.write(canonical.ljust(size, b" "))  # the format allows trailing spaces in the header
