"""The one reader and writer of `text/cache.py`'s array entries, checked byte for byte.

An entry is a safetensors file (little-endian F32/F64 tensors) whose `__metadata__` holds the
entry format, the cache key it was written under and the SHA-256 of its data section. Reading
checks, before any value is used: the header (through `safetensors_header.read_header`, so a
hostile length or shape is refused before anything is allocated), the key, the exact tensor
names, dtypes and ranks the caller expects, that the data section is exactly as long as the
tensors, the digest (a truncated, garbled or bit-flipped entry fails it) and that every value
is finite. A failed check raises `DamagedEntry`, whose message says what was wrong; the cache
then recomputes the entry instead of scoring meaningless numbers.

Not handled: entries of other formats (the cache version in the key keeps old ones from being
looked up at all), shapes beyond rank (each caller checks its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np

from embfilter_cli.safetensors_header import ITEMSIZE, SafetensorsHeaderError, read_header

ENTRY_FORMAT = "embfilter.cache-entry/1"
MAX_HEADER_BYTES = 16 << 20  # a key, a digest and a little JSON: anything bigger is not ours

_TAGS: dict[np.dtype[Any], str] = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64"}
_DTYPES: dict[str, np.dtype[Any]] = {tag: dtype for dtype, tag in _TAGS.items()}


class DamagedEntry(Exception):
    """A cache entry that exists but cannot be trusted; the message says why."""


def write_entry(path: Path, key: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `arrays` (float32 or float64) and `metadata` under `key` to `path`, atomically."""
    from embfilter_cli.files import atomic_path

    header: dict[str, object] = {}
    chunks = []
    offset = 0
    digest = hashlib.sha256()
    for name, array in arrays.items():
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        raw = little.tobytes()
        header[name] = {
            "dtype": _TAGS[little.dtype],
            "shape": list(little.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        digest.update(raw)
        chunks.append(raw)
    header["__metadata__"] = {**metadata, "format": ENTRY_FORMAT, "key": key, "sha256": digest.hexdigest()}
    body = json.dumps(header).encode("utf-8")
    body += b" " * (-len(body) % 8)  # the data section starts 8-byte aligned, as safetensors writers do
    with atomic_path(path, force=True) as tmp, tmp.open("wb") as handle:
        handle.write(struct.pack("<Q", len(body)) + body)
        for raw in chunks:
            handle.write(raw)


def read_entry(path: Path, key: str, want: dict[str, tuple[str, int]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of the entry at `path`, every byte checked.

    Args:
        path: an existing entry (callers treat a missing file as a plain miss).
        key: the cache key the entry must have been written under.
        want: tensor name → (dtype tag "F32"/"F64", rank); the entry must hold exactly these.

    Raises:
        DamagedEntry: the file is not a complete, finite entry for `key` of that layout.
    """
    try:
        # O_NONBLOCK: a FIFO planted at the entry's name must not hang the run (it is refused below).
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fp:
            info = os.fstat(fp.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DamagedEntry("it is not a regular file")
            size = info.st_size
            try:
                header = read_header(fp, max_length=max(1, min(size - 8, MAX_HEADER_BYTES)), itemsizes=ITEMSIZE)
            except SafetensorsHeaderError as exc:
                raise DamagedEntry(f"its header is unreadable ({exc.problem})") from None
            expected = size - header.data_start
            data = bytearray(max(expected, 0))
            got = fp.readinto(data) if expected > 0 else 0
    except OSError as exc:
        raise DamagedEntry(f"it cannot be read ({exc.strerror or exc})") from None
    meta = header.metadata
    if meta.get("format") != ENTRY_FORMAT or meta.get("key") != key:
        raise DamagedEntry("it was not written for this cache key")
    entries = header.by_name()
    if set(entries) != set(want):
        raise DamagedEntry(f"it holds tensors {sorted(entries)}, not {sorted(want)}")
    end = max((e.end for e in entries.values()), default=0)
    if got != expected or expected != end:
        raise DamagedEntry(f"its data section has {max(got, 0)} bytes, its header describes {end}")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise DamagedEntry("its bytes do not match the checksum it was written with")
    arrays = {}
    for name, (tag, rank) in want.items():
        entry = entries[name]
        if entry.dtype != tag or len(entry.shape) != rank:
            raise DamagedEntry(f"tensor {name} is {entry.dtype} of rank {len(entry.shape)}, not {tag} of rank {rank}")
        array = np.frombuffer(data, dtype=_DTYPES[tag], count=int(np.prod(entry.shape)), offset=entry.begin)
        # A writable view of the buffer (no second copy of a large entry) on little-endian machines.
        array = array.reshape(entry.shape).astype(_DTYPES[tag].newbyteorder("="), copy=False)
        if not np.isfinite(array).all():
            raise DamagedEntry(f"tensor {name} holds NaN or infinite values")
        arrays[name] = array
    return arrays, meta
