"""Stream stored embedding vectors through a filter: .npy, JSONL and safetensors, in and out.

Readers ("sources") hand out batches of rows; writers ("sinks") write them; `filter_stream` joins
the two with the projection in between. Memory stays bounded by the batch size, never by the file:

- `.npy` and safetensors files are memory-mapped. Pages already processed are dropped from the
  process (`madvise(MADV_DONTNEED)`; they stay in the page cache), so resident memory does not
  grow with the file. From a pipe, rows are read batch by batch into one reused buffer.
- Binary outputs are written as raw batches after a header. When the row count is not known in
  advance (JSONL in, .npy/safetensors out) the header is reserved and patched at the end on a
  seekable file, or the data is spooled to a temporary file first on a pipe.
- JSONL is parsed line by line; every field other than the vector passes through (re-serialised
  compactly, same values, same key order).

Arrays of any rank are accepted: the filter acts on the last axis, so a (n, seq, d) array gives
(n, seq, k). Rows are numbered from 0 in messages; JSONL lines from 1, as in editors.

Precision: float16/float32 inputs are computed in float32, float64 (and every JSONL input, whose
numbers are doubles) in float64. JSONL output writes float64 values as the shortest round-trip
decimal, float32 with 9 and float16 with 5 significant digits (enough to round-trip exactly).

Not handled: integer or complex vectors, structured dtypes, Fortran-ordered .npy files larger than
memory (they are read whole: np.save writes C order unless asked otherwise), .npz archives,
compressed JSONL, JSON arrays of vectors (one object per line only).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from embfilter_cli.errors import InputDataError

FORMATS = ("npy", "jsonl", "safetensors")
EXTENSIONS = {".npy": "npy", ".jsonl": "jsonl", ".ndjson": "jsonl", ".safetensors": "safetensors"}
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
DEFAULT_BATCH_ROWS = 8192
JSONL_BATCH_ROWS = 1024  # each parsed line briefly holds Python floats (32 bytes each): keep batches small
SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit
_COPY_CHUNK = 8 << 20

# safetensors dtype tag <-> our dtype names (bfloat16 is stored as raw uint16 bits in numpy)
_ST_TO_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_NAME_TO_ST = {v: k for k, v in _ST_TO_NAME.items()}
_ST_ITEMSIZE = {
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
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_JSONL_DIGITS = {"float32": 9, "float16": 5, "bfloat16": 4}

ProgressFn = Callable[[int, int | None], None]  # (units done, units total or None); rows, or bytes for JSONL


# --------------------------------------------------------------------------- formats and dtypes


def format_from_path(path: str | os.PathLike[str]) -> str | None:
    """The vector format a file name implies (`.npy`, `.jsonl`/`.ndjson`, `.safetensors`), else None."""
    return EXTENSIONS.get(Path(path).suffix.lower())


def sniff_format(head: bytes) -> str | None:
    """Guess the format from the first bytes of a stream (at least 9 for safetensors), else None.

    `.npy` starts with its magic string; safetensors with an 8-byte little-endian header length
    followed by `{`; JSONL with `{` (after optional whitespace).
    """
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head.lstrip().startswith(b"{"):
        return "jsonl"
    return None


def storage_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype that stores values of dtype `name` (bfloat16 as uint16 bit patterns)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    # a NaN whose payload sits in the low bits would round to Inf: keep it a (quiet) NaN
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def _dtype_name(dtype: np.dtype[Any]) -> str | None:
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return {2: "float16", 4: "float32", 8: "float64"}[dtype.itemsize]
    return None


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Consecutive rows of the input, as a float array (m, d), plus what locates them."""

    start: int  # flat index of the first row
    vectors: np.ndarray
    done: int  # progress units consumed so far (rows, or bytes for JSONL)
    records: list[dict[str, Any]] | None = None  # JSONL: the parsed objects, in order
    lines: list[int] | None = None  # JSONL: 1-based line numbers


@dataclass
class Passthrough:
    """Raw bytes of a safetensors tensor that is not filtered, in file order."""

    name: str
    data: bytes


@dataclass
class TensorEntry:
    """One tensor of a safetensors header."""

    name: str
    dtype: str  # safetensors tag, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int


class VectorSource:
    """A stream of vectors; subclasses set the attributes in `__init__`."""

    format: str = ""
    name: str = ""  # the path, or "stdin", for messages
    lead_shape: tuple[int, ...] | None = None  # shape without the last axis; None when unknown (JSONL)
    dim: int | None = None  # last-axis length; None until known
    dtype: str = "float32"  # the stored dtype's name
    progress_total: int | None = None

    @property
    def rows(self) -> int | None:
        return None if self.lead_shape is None else math.prod(self.lead_shape)

    def items(self, batch_rows: int, passthrough: bool = False) -> Iterator[Batch | Passthrough]:
        """Batches of rows (and, when `passthrough`, the bytes of other tensors) in input order."""
        raise NotImplementedError

    def where(self, batch: Batch, i: int) -> str:
        """Human words for row `i` of `batch` ("line 7", "row 12", "vector (3, 4)")."""
        if batch.lines is not None:
            return f"line {batch.lines[i]}"
        flat = batch.start + i
        if self.lead_shape is None or len(self.lead_shape) <= 1:
            return f"row {flat}"
        return f"vector {tuple(int(j) for j in np.unravel_index(flat, self.lead_shape))}"

    def close(self) -> None:
        """Release file handles and mappings."""


def _read_exact_into(fp: IO[bytes], buffer: memoryview) -> int:
    """Fill `buffer` from a stream that may return short reads (pipes); returns bytes read."""
    total = 0
    while total < len(buffer):
        n = fp.readinto(buffer[total:])  # type: ignore[attr-defined]
        if not n:
            break
        total += n
    return total


class _Matrix:
    """Rows of a (rows, d) matrix stored raw at `offset` of a file or stream, read batch by batch."""

    def __init__(
        self,
        fp: IO[bytes],
        path: Path | None,
        offset: int,
        rows: int,
        dim: int,
        dtype: np.dtype[Any],
        name: str,
        what: str,
    ) -> None:
        self.fp, self.path, self.offset, self.rows, self.dim, self.dtype = fp, path, offset, rows, dim, dtype
        self.name, self.what = name, what
        self.nbytes = rows * dim * dtype.itemsize
        self._map: mmap.mmap | None = None
        if path is not None and self.nbytes:
            size = path.stat().st_size
            if size < offset + self.nbytes:
                raise InputDataError(
                    f"{name} is truncated: {what} promises {rows}×{dim} {dtype.name} values ({offset + self.nbytes} "
                    f"bytes with the header) but the file has {size} bytes; recreate it"
                )
            self._map = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(self._map, "madvise"):
                self._map.madvise(mmap.MADV_SEQUENTIAL)

    def batches(self, batch_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, array) pairs; arrays are views or a reused buffer, valid until the next one."""
        row_bytes = self.dim * self.dtype.itemsize
        if self._map is not None:
            full = np.ndarray((self.rows, self.dim), dtype=self.dtype, buffer=self._map, offset=self.offset)
            released = 0
            for start in range(0, self.rows, batch_rows):
                yield start, full[start : start + batch_rows]
                # The rows are done: unmap their pages so resident memory stays one batch, not the file.
                # The data stays in the page cache; a later touch would simply fault it back in.
                done = (self.offset + min(start + batch_rows, self.rows) * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
                if done > released and hasattr(self._map, "madvise"):
                    self._map.madvise(mmap.MADV_DONTNEED, released, done - released)
                    released = done
            del full
            return
        buf = np.empty((min(batch_rows, max(self.rows, 1)), self.dim), dtype=self.dtype)
        for start in range(0, self.rows, batch_rows):
            m = min(batch_rows, self.rows - start)
            view = memoryview(buf[:m].reshape(-1).view(np.uint8))
            got = _read_exact_into(self.fp, view)
            if got < len(view):
                rows_read = start + got // row_bytes
                raise InputDataError(
                    f"{self.name} ended after {rows_read} of the {self.rows} rows that {self.what} promises; "
                    "the input is truncated"
                )
            yield start, buf[:m]

    def skip_rest(self) -> None:
        """Consume the matrix's bytes from a stream without using them."""
        if self._map is None:
            _skip(self.fp, self.nbytes, self.name)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
            self._map = None


def _skip(fp: IO[bytes], nbytes: int, name: str) -> None:
    left = nbytes
    while left:
        chunk = fp.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise InputDataError(f"{name} ended {left} bytes early; the input is truncated")
        left -= len(chunk)


def _as_float(batch: np.ndarray, dtype: str) -> np.ndarray:
    """Native-endian floats from stored values (bfloat16 bits become float32)."""
    if dtype == "bfloat16":
        return bfloat16_to_float32(batch)
    if not batch.dtype.isnative:
        return batch.astype(batch.dtype.newbyteorder("="))
    return batch


# --------------------------------------------------------------------------- .npy


class NpySource(VectorSource):
    """A .npy array from a file (memory-mapped) or a stream (read batch by batch)."""

    format = "npy"

    def __init__(self, fp: IO[bytes], name: str, path: Path | None = None) -> None:
        self.fp, self.name = fp, name
        try:
            version = np.lib.format.read_magic(fp)
        except ValueError as exc:
            raise InputDataError(
                f"{name} is not a .npy file ({exc}); pass --format jsonl or --format safetensors if it is one of those"
            ) from None
        try:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise InputDataError(
                    f"{name} is .npy format version {version[0]}.{version[1]}; re-save it with np.save"
                )
        except (ValueError, SyntaxError) as exc:
            raise InputDataError(f"{name} has a damaged .npy header ({exc}); recreate it") from None
        offset = fp.tell() if path is not None else 0  # only a mapped file needs it; pipes cannot tell
        name_of = _dtype_name(dtype)
        if name_of is None:
            raise InputDataError(
                f"{name} holds {dtype} values; embfilter reads float16, float32 or float64 vectors "
                "(convert with x.astype('float32'))"
            )
        self.dtype = name_of
        shape = tuple(int(s) for s in shape)
        if len(shape) == 0:
            raise InputDataError(f"{name} holds a single number, not vectors; save a (rows, dim) array")
        if shape == (0,):
            shape = (0, 0)  # np.save(np.array([])): an empty input, dimension unknown
        self.lead_shape, self.dim = shape[:-1], shape[-1]
        self._fortran_whole: np.ndarray | None = None
        if fortran and len(shape) > 1 and math.prod(shape):
            # Column-major rows are scattered over the whole file, so they cannot be streamed by rows.
            nbytes = math.prod(shape) * dtype.itemsize
            data = fp.read(nbytes)
            if len(data) < nbytes:
                raise InputDataError(
                    f"{name} is truncated: its .npy header promises {nbytes} data bytes, found {len(data)}"
                )
            whole = np.frombuffer(data, dtype=dtype).reshape(shape, order="F")
            self._fortran_whole = np.ascontiguousarray(whole).reshape(-1, self.dim)
            self._matrix = None
        else:
            self._matrix = _Matrix(
                fp, path, offset, math.prod(self.lead_shape), self.dim, dtype, name, "its .npy header"
            )
        self.progress_total = self.rows

    def items(self, batch_rows: int, passthrough: bool = False) -> Iterator[Batch | Passthrough]:
        if self._fortran_whole is not None:
            for start in range(0, len(self._fortran_whole), batch_rows):
                chunk = self._fortran_whole[start : start + batch_rows]
                yield Batch(start, _as_float(chunk, self.dtype), start + len(chunk))
            return
        assert self._matrix is not None
        for start, chunk in self._matrix.batches(batch_rows):
            yield Batch(start, _as_float(chunk, self.dtype), start + len(chunk))

    def close(self) -> None:
        if self._matrix is not None:
            self._matrix.close()


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(fp: IO[bytes], name: str) -> tuple[dict[str, str], list[TensorEntry], int]:
    """Parse a safetensors header from the stream's start: (metadata, tensors in file order, header bytes)."""
    head = fp.read(8)
    if len(head) < 8:
        raise InputDataError(
            f"{name} is not a safetensors file ({len(head)} bytes, shorter than the 8-byte header length)"
        )
    n = int.from_bytes(head, "little")
    if not 0 < n <= SAFETENSORS_MAX_HEADER:
        raise InputDataError(
            f"{name} is not a safetensors file (its first 8 bytes give a header length of {n}); "
            "pass --format npy or --format jsonl if it is one of those"
        )
    raw = fp.read(n)
    try:
        header = json.loads(raw.decode("utf-8")) if len(raw) == n else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise InputDataError(
            f"{name} is not a safetensors file (its {n}-byte header is not a JSON object); recreate it"
        )
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for key, value in header.items():
        try:
            entry = TensorEntry(
                key,
                str(value["dtype"]),
                tuple(int(s) for s in value["shape"]),
                int(value["data_offsets"][0]),
                int(value["data_offsets"][1]),
            )
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputDataError(f"{name}: header entry {key!r} is malformed; recreate the file") from None
        itemsize = _ST_ITEMSIZE.get(entry.dtype)
        if itemsize is None or entry.end - entry.begin != math.prod(entry.shape) * itemsize or entry.begin < 0:
            raise InputDataError(
                f"{name}: tensor {key!r} ({entry.dtype} {list(entry.shape)}) has byte range "
                f"[{entry.begin}, {entry.end}) that does not match its shape; recreate the file"
            )
        entries.append(entry)
    entries.sort(key=lambda e: (e.begin, e.end))
    for before, after in itertools.pairwise(entries):
        if after.begin < before.end:
            raise InputDataError(f"{name}: tensors {before.name!r} and {after.name!r} overlap; the file is damaged")
    return {str(k): str(v) for k, v in metadata.items()}, entries, 8 + n


class SafetensorsSource(VectorSource):
    """One float tensor of a safetensors file or stream; the other tensors can pass through."""

    format = "safetensors"

    def __init__(self, fp: IO[bytes], name: str, path: Path | None = None, tensor: str | None = None) -> None:
        self.fp, self.name, self.path = fp, name, path
        self.metadata, self.entries, self.data_start = read_safetensors_header(fp, name)
        names = [e.name for e in self.entries]
        if tensor is not None:
            found = [e for e in self.entries if e.name == tensor]
            if not found:
                raise InputDataError(f"{name} has no tensor {tensor!r}; it holds {', '.join(names) or 'no tensors'}")
            target = found[0]
        else:
            candidates = [e for e in self.entries if len(e.shape) == 2 and e.dtype in _ST_TO_NAME]
            if len(candidates) != 1:
                detail = ", ".join(f"{e.name} {e.dtype} {list(e.shape)}" for e in self.entries) or "no tensors"
                how = "several" if candidates else "no"
                raise InputDataError(
                    f"{name} holds {how} 2-D float tensors ({detail}); pass --tensor NAME to choose one"
                )
            target = candidates[0]
        if target.dtype not in _ST_TO_NAME or not target.shape:
            raise InputDataError(
                f"{name}: tensor {target.name!r} is {target.dtype} {list(target.shape)}; embfilter filters float16, "
                "bfloat16, float32 or float64 tensors with at least one axis"
            )
        self.target = target
        self.dtype = _ST_TO_NAME[target.dtype]
        self.lead_shape, self.dim = target.shape[:-1], target.shape[-1]
        self.progress_total = self.rows
        self._matrix = _Matrix(
            fp,
            path,
            self.data_start + target.begin,
            math.prod(self.lead_shape),
            self.dim,
            storage_dtype(self.dtype).newbyteorder("<"),
            name,
            f"tensor {target.name!r}",
        )

    def items(self, batch_rows: int, passthrough: bool = False) -> Iterator[Batch | Passthrough]:
        position = 0  # bytes consumed of the data section, for streams
        for entry in self.entries:
            if entry is self.target:
                if self.path is None and entry.begin > position:
                    _skip(self.fp, entry.begin - position, self.name)
                for start, chunk in self._matrix.batches(batch_rows):
                    yield Batch(start, _as_float(chunk, self.dtype), start + len(chunk))
                position = entry.end
                continue
            if not passthrough and self.path is not None:
                continue
            if self.path is None and entry.begin > position:
                _skip(self.fp, entry.begin - position, self.name)
            if self.path is not None:
                self.fp.seek(self.data_start + entry.begin)
            left = entry.end - entry.begin
            while left:
                chunk = self.fp.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise InputDataError(f"{self.name} ended inside tensor {entry.name!r}; the input is truncated")
                left -= len(chunk)
                if passthrough:
                    yield Passthrough(entry.name, chunk)
            position = entry.end

    def close(self) -> None:
        self._matrix.close()


# --------------------------------------------------------------------------- JSONL


class JsonlSource(VectorSource):
    """One JSON object per line; the vector is in `field`, everything else passes through."""

    format = "jsonl"
    dtype = "float64"  # JSON numbers are doubles

    def __init__(
        self, fp: IO[bytes], name: str, field: str, expected_dim: int, dim_context: str = "", size: int | None = None
    ) -> None:
        self.fp, self.name, self.field = fp, name, field
        self.expected_dim, self.dim_context = expected_dim, dim_context
        self.lead_shape = None
        self.dim = None
        self.progress_total = size

    def _vector(self, record: Any, number: int, good_before: bool) -> np.ndarray:
        where = f"{self.name} line {number}"
        if not isinstance(record, dict):
            raise InputDataError(
                f"{where} is a JSON {type(record).__name__}, not an object; "
                f"each line must be an object with the vector in field {self.field!r}"
            )
        if self.field not in record:
            keys = ", ".join(map(str, list(record)[:8])) or "none"
            raise InputDataError(f"{where} has no field {self.field!r} (its fields: {keys}); pass --field NAME")
        value = record[self.field]
        if not isinstance(value, list):
            raise InputDataError(
                f"{where}: field {self.field!r} is a JSON {_json_kind(value)}, expected a list of numbers"
            )
        try:
            vec = np.asarray(value)
        except ValueError:  # nested lists of unequal length
            vec = np.asarray(value, dtype=object)
        if vec.ndim != 1 or vec.dtype.kind not in "iuf":
            bad = next((i for i, v in enumerate(value) if isinstance(v, bool) or not isinstance(v, (int, float))), 0)
            raise InputDataError(
                f"{where}: field {self.field!r} holds {json.dumps(value[bad])[:40]} at position {bad}; "
                "vectors must be flat lists of numbers"
            )
        if len(vec) != self.expected_dim:
            if good_before:
                raise InputDataError(
                    f"{where}: field {self.field!r} has {len(vec)} numbers but earlier lines have {self.expected_dim}; "
                    "all vectors must have the same length"
                )
            raise InputDataError(
                f"{where}: field {self.field!r} has {len(vec)} numbers but {self.dim_context or f'{self.expected_dim} are expected'}"
            )
        return vec

    def items(self, batch_rows: int, passthrough: bool = False) -> Iterator[Batch | Passthrough]:
        buf = np.empty((batch_rows, self.expected_dim), dtype=np.float64)
        records: list[dict[str, Any]] = []
        lines: list[int] = []
        consumed = 0
        row = 0
        for number, raw in enumerate(self.fp, start=1):
            consumed += len(raw)
            if not raw.strip():
                continue  # blank lines (e.g. a trailing one) carry no record
            try:
                record = json.loads(raw.rstrip(b"\r\n"))  # so error columns refer to this line
            except UnicodeDecodeError as exc:
                raise InputDataError(
                    f"{self.name} line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            except json.JSONDecodeError as exc:
                raise InputDataError(
                    f"{self.name} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line"
                ) from None
            buf[len(records)] = self._vector(record, number, good_before=row > 0)
            record[self.field] = None  # keep the key's position; drop the Python floats now
            records.append(record)
            lines.append(number)
            row += 1
            self.dim = self.expected_dim
            if len(records) == batch_rows:
                yield Batch(row - len(records), buf[: len(records)], consumed, records, lines)
                records, lines = [], []
        if records:
            yield Batch(row - len(records), buf[: len(records)], consumed, records, lines)


def _json_kind(value: Any) -> str:
    return {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


# --------------------------------------------------------------------------- sinks


class VectorSink:
    """Where filtered rows go. `begin` once, `write` per batch, `finish` once."""

    def begin(self, lead_shape: tuple[int, ...] | None, dim: int, dtype: str) -> None:
        raise NotImplementedError

    def write(self, vectors: np.ndarray, batch: Batch) -> None:
        raise NotImplementedError

    def passthrough(self, item: Passthrough) -> None:
        """Raw bytes of an unfiltered tensor (only safetensors keeps them)."""

    def finish(self) -> None:
        raise NotImplementedError


class _BinarySink(VectorSink):
    """Header then raw rows. With an unknown row count the header is patched (seekable) or spooled."""

    def __init__(self, fp: IO[bytes], seekable: bool) -> None:
        self.fp, self.seekable = fp, seekable
        self.rows_written = 0
        self._spool: IO[bytes] | None = None
        self._reserved = 0
        self.lead_shape: tuple[int, ...] | None = None
        self.dim = 0
        self.dtype = "float32"

    def _header(self, lead_shape: tuple[int, ...], min_len: int = 0) -> bytes:
        raise NotImplementedError

    def begin(self, lead_shape: tuple[int, ...] | None, dim: int, dtype: str) -> None:
        self.lead_shape, self.dim, self.dtype = lead_shape, dim, dtype
        if lead_shape is not None:
            self.fp.write(self._header(lead_shape))
        elif self.seekable:
            placeholder = self._header((10**19 - 1,))  # as many digits as any real row count
            self._reserved = len(placeholder)
            self.fp.write(placeholder)
        else:
            self._spool = tempfile.TemporaryFile(prefix="embfilter-")

    def _data(self) -> IO[bytes]:
        return self._spool if self._spool is not None else self.fp

    def write(self, vectors: np.ndarray, batch: Batch) -> None:
        self._data().write(memoryview(np.ascontiguousarray(vectors)).cast("B"))
        self.rows_written += len(vectors)

    def finish(self) -> None:
        if self.lead_shape is not None:
            return
        final = self._header((self.rows_written,), min_len=self._reserved)
        if self._spool is not None:
            self.fp.write(final)
            self._spool.seek(0)
            shutil.copyfileobj(self._spool, self.fp, _COPY_CHUNK)
            self._spool.close()
        else:
            end = self.fp.tell()
            self.fp.seek(0)
            self.fp.write(final)
            self.fp.seek(end)


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...], min_len: int = 0) -> bytes:
    """A version 1.0 .npy header for a C-order array, padded (64-byte aligned) to at least `min_len` bytes."""
    text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.encode("latin1")
    size = 10 + len(body) + 1
    total = max(-(-size // 64) * 64, min_len)
    body += b" " * (total - size) + b"\n"
    return b"\x93NUMPY\x01\x00" + (len(body)).to_bytes(2, "little") + body


class NpySink(_BinarySink):
    """A C-order .npy array (n, …, k)."""

    def _header(self, lead_shape: tuple[int, ...], min_len: int = 0) -> bytes:
        return npy_header(np.dtype(self.dtype), (*tuple(lead_shape), self.dim), min_len)


class SafetensorsSink(_BinarySink):
    """A safetensors file holding the filtered tensor, plus any passed-through tensors in input order."""

    def __init__(
        self,
        fp: IO[bytes],
        seekable: bool,
        tensor_name: str,
        metadata: dict[str, str],
        layout: list[TensorEntry] | None = None,
        target: TensorEntry | None = None,
    ) -> None:
        super().__init__(fp, seekable)
        self.tensor_name, self.metadata = tensor_name, metadata
        self.layout, self.target = layout, target

    def _header(self, lead_shape: tuple[int, ...], min_len: int = 0) -> bytes:
        shape = [*list(lead_shape), self.dim]
        nbytes = math.prod(shape) * storage_dtype(self.dtype).itemsize
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for entry in self.layout or [None]:  # type: ignore[list-item]
            if entry is None or entry is self.target:
                name = self.tensor_name if entry is None else entry.name
                header[name] = {
                    "dtype": _NAME_TO_ST[self.dtype],
                    "shape": shape,
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            else:
                size = entry.end - entry.begin
                header[entry.name] = {
                    "dtype": entry.dtype,
                    "shape": list(entry.shape),
                    "data_offsets": [offset, offset + size],
                }
                offset += size
        body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        target_len = max(-(-len(body) // 8) * 8, min_len - 8)  # the data section starts 8-byte aligned
        body += b" " * (target_len - len(body))  # the format allows trailing spaces in the header
        return len(body).to_bytes(8, "little") + body

    def passthrough(self, item: Passthrough) -> None:
        self._data().write(item.data)

    def write(self, vectors: np.ndarray, batch: Batch) -> None:
        if self.dtype == "bfloat16":
            vectors = float32_to_bfloat16(vectors)
        super().write(vectors.astype(vectors.dtype.newbyteorder("<"), copy=False), batch)


class JsonlSink(VectorSink):
    """One JSON object per line: the source's record with the vector replaced, or {field: vector}."""

    def __init__(self, fp: IO[bytes], field: str) -> None:
        self.fp, self.field = fp, field
        self._template = ""
        self.dtype = "float64"

    def begin(self, lead_shape: tuple[int, ...] | None, dim: int, dtype: str) -> None:
        self.dtype = dtype
        digits = _JSONL_DIGITS.get(dtype)
        # %-formatting a whole row in one call is ~3× faster than json.dumps on a list of floats
        self._template = "[" + ",".join([f"%.{digits}g"] * dim) + "]" if digits else ""

    def _row_text(self, row: np.ndarray) -> str:
        values = row.tolist()
        if self._template and np.isfinite(row).all():
            return self._template % tuple(values)
        return json.dumps(values, separators=(",", ":"))  # float64, or NaN/Infinity tokens (--allow-nonfinite)

    def write(self, vectors: np.ndarray, batch: Batch) -> None:
        if self.dtype == "bfloat16":
            vectors = bfloat16_to_float32(float32_to_bfloat16(vectors))
        out = []
        for i in range(len(vectors)):
            record = batch.records[i] if batch.records is not None else {self.field: None}
            out.append(self._line(record, self._row_text(vectors[i])))
        self.fp.write(b"".join(out))

    def _line(self, record: dict[str, Any], vector_text: str) -> bytes:
        for ascii_only in (False, True):
            parts = []
            for key, value in record.items():
                text = (
                    vector_text
                    if key == self.field
                    else json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))
                )
                parts.append(json.dumps(key, ensure_ascii=ascii_only) + ":" + text)
            if self.field not in record:
                parts.append(json.dumps(self.field) + ":" + vector_text)
            line = "{" + ",".join(parts) + "}\n"
            try:
                return line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a \udXXX escape: keep it escaped
                continue
        raise AssertionError("unreachable: ASCII-only JSON always encodes")

    def finish(self) -> None:
        pass


# --------------------------------------------------------------------------- the filter loop


@dataclass
class FilterStats:
    """What `filter_stream` did."""

    rows: int
    input_dim: int
    output_dim: int
    input_dtype: str
    output_dtype: str
    seconds: float
    nonfinite_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def filter_stream(
    source: VectorSource,
    sink: VectorSink,
    projection: np.ndarray,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    output_dtype: str | None = None,
    normalize: bool = False,
    allow_nonfinite: bool = False,
    dim_context: str = "",
    progress: ProgressFn | None = None,
) -> FilterStats:
    """Project every vector of `source` with `projection` (k, d) and write the results to `sink`.

    Args:
        source: where the vectors come from.
        sink: where the (…, k) results go; it receives `begin`, one `write` per batch, `finish`.
        projection: the filter matrix P; each row x becomes P·x.
        batch_rows: rows per batch; memory is about batch_rows × (d + k) × 4 bytes.
        output_dtype: dtype name of the written values; default the source's dtype.
        normalize: L2-normalise each result (all-zero results stay zero).
        allow_nonfinite: let NaN/Inf inputs through (their results are NaN/Inf) instead of failing.
        dim_context: words for a dimension mismatch, e.g. "the filter expects 576 (fitted on X)".
        progress: called after each batch with (units done, units total or None).

    Raises:
        InputDataError: wrong dimension, NaN/Inf, malformed or truncated input; names the row or line.
    """
    k, d = projection.shape
    out_dtype = output_dtype or source.dtype
    if source.dim is not None and source.dim != d and not (source.rows == 0 and source.dim == 0):
        raise InputDataError(
            f"{source.name} holds {source.dim}-dimensional vectors but {dim_context or f'{d} are expected'}"
        )
    compute = np.dtype(np.float64 if "float64" in (source.dtype, out_dtype) else np.float32)
    # (d, k): one GEMM per batch, no per-row Python. A transposed view costs BLAS nothing and saves a copy.
    pt = projection.T if projection.dtype == compute else projection.T.astype(compute)
    out_buf = np.empty((batch_rows, k), dtype=compute)
    started = time.perf_counter()
    sink.begin(None if source.lead_shape is None else source.lead_shape, k, out_dtype)
    rows = 0
    nonfinite_rows = 0
    for item in source.items(batch_rows, passthrough=isinstance(sink, SafetensorsSink)):
        if isinstance(item, Passthrough):
            sink.passthrough(item)
            continue
        x = item.vectors if item.vectors.dtype == compute else item.vectors.astype(compute)
        finite_rows = _finite_rows(x)
        if not finite_rows.all():
            bad = int(np.flatnonzero(~finite_rows)[0])
            if not allow_nonfinite:
                col = int(np.flatnonzero(~np.isfinite(x[bad]))[0])
                raise InputDataError(
                    f"{source.name} {source.where(item, bad)} has {x[bad, col]} at position {col}; clean the input "
                    "or pass --allow-nonfinite to let such rows through (their results are NaN/Inf)"
                )
            nonfinite_rows += int((~finite_rows).sum())
        y = np.matmul(x, pt, out=out_buf[: len(x)])
        if normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", y, y))
            norms[norms == 0] = 1  # an all-zero result has no direction; keep it zero rather than NaN
            y /= norms[:, None]
        if out_dtype in ("float16", "float32") and compute != np.dtype(out_dtype):
            with np.errstate(over="ignore"):  # float16 overflow is reported below, with the row
                y = y.astype(out_dtype)
        if out_dtype == "float16" and finite_rows.all():
            over = ~np.isfinite(y).all(axis=1)
            if over.any():
                bad = int(np.flatnonzero(over)[0])
                raise InputDataError(
                    f"{source.name} {source.where(item, bad)}: a filtered value exceeds float16's range (±65504); "
                    "pass --dtype float32 or --normalize"
                )
        sink.write(y, item)
        rows += len(x)
        if progress is not None:
            progress(item.done, source.progress_total)
    sink.finish()
    return FilterStats(rows, d, k, source.dtype, out_dtype, time.perf_counter() - started, nonfinite_rows)


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Which rows hold only finite values, at the cost of one row sum (no (m, d) temporary).

    NaN or ±Inf anywhere in a row makes its sum non-finite, so a finite sum proves the row finite;
    only rows whose sum is not finite (NaN/Inf, or finite values overflowing) are checked exactly.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.isfinite(x.sum(axis=1))
    if not ok.all():
        suspect = np.flatnonzero(~ok)
        ok[suspect] = np.isfinite(x[suspect]).all(axis=1)
    return ok


# --------------------------------------------------------------------------- opening


def open_source(
    fp: IO[bytes],
    fmt: str,
    name: str,
    *,
    path: Path | None = None,
    field: str = "embedding",
    tensor: str | None = None,
    expected_dim: int,
    dim_context: str = "",
) -> VectorSource:
    """Open a reader of format `fmt` on `fp` (a file opened "rb" when `path` is given, else a stream)."""
    if fmt == "npy":
        return NpySource(fp, name, path)
    if fmt == "safetensors":
        return SafetensorsSource(fp, name, path, tensor)
    if fmt == "jsonl":
        size = path.stat().st_size if path is not None else None
        return JsonlSource(fp, name, field, expected_dim, dim_context, size)
    raise ValueError(f"unknown vector format {fmt!r}")  # the CLI only passes FORMATS


class _PrefixedRaw(io.RawIOBase):
    """A raw stream that first returns `head` (bytes already read for sniffing), then the rest of `fp`."""

    def __init__(self, head: bytes, fp: IO[bytes]) -> None:
        super().__init__()
        self._head, self._fp = head, fp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._fp.readinto(buffer)  # type: ignore[attr-defined]


def peek_head(fp: IO[bytes], n: int = 16) -> tuple[IO[bytes], bytes]:
    """Read a stream's first `n` bytes for sniffing; returns (a stream that still starts with them, head).

    Works on pipes, where neither seeking back nor `peek` (which may return fewer bytes) is reliable.
    """
    head = fp.read(n)
    return io.BufferedReader(_PrefixedRaw(head, fp), buffer_size=1 << 20), head  # type: ignore[arg-type]
