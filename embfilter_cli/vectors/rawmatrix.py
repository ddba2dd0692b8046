"""Row-major matrices stored raw after a header (.npy, safetensors): read by batches, written with a header.

- Reading: from a file the matrix is memory-mapped, and pages already processed are dropped from
  the process (`madvise(MADV_DONTNEED)`; they stay in the page cache), so resident memory does not
  grow with the file. From a pipe, rows are read batch by batch into one reused buffer.
- Writing: raw batches after a header. When the row count is not known in advance (JSONL in,
  .npy/safetensors out) the header is reserved and patched at the end on a seekable file, or the
  data is spooled to a temporary file first on a pipe.
"""

from __future__ import annotations

import mmap
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from embfilter_cli.errors import InputDataError
from embfilter_cli.vectors.base import Batch, VectorSink

COPY_CHUNK = 8 << 20


def read_exact_into(fp: IO[bytes], buffer: memoryview) -> int:
    """Fill `buffer` from a stream that may return short reads (pipes); returns bytes read."""
    total = 0
    while total < len(buffer):
        n = fp.readinto(buffer[total:])  # type: ignore[attr-defined]
        if not n:
            break
        total += n
    return total


class RawMatrix:
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
            view = buf[:m].reshape(-1).view(np.uint8).data
            got = read_exact_into(self.fp, view)
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
            skip_bytes(self.fp, self.nbytes, self.name)

    def close(self) -> None:
        """Release the memory map, if any (kept alive while a caller still holds a view)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
            self._map = None


def skip_bytes(fp: IO[bytes], nbytes: int, name: str) -> None:
    """Read and drop `nbytes` from a stream; an early end is an InputDataError naming `name`."""
    left = nbytes
    while left:
        chunk = fp.read(min(left, COPY_CHUNK))
        if not chunk:
            raise InputDataError(f"{name} ended {left} bytes early; the input is truncated")
        left -= len(chunk)


class BinarySink(VectorSink):
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
        """Write the header now when the shape is known, else reserve room (file) or spool (pipe)."""
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
        """Append the rows' raw bytes."""
        self._data().write(np.ascontiguousarray(vectors).data.cast("B"))
        self.rows_written += len(vectors)

    def finish(self) -> None:
        """Write the final header once the row count is known (and the spooled rows after it)."""
        if self.lead_shape is not None:
            return
        final = self._header((self.rows_written,), min_len=self._reserved)
        if self._spool is not None:
            self.fp.write(final)
            self._spool.seek(0)
            shutil.copyfileobj(self._spool, self.fp, COPY_CHUNK)
            self._spool.close()
        else:
            end = self.fp.tell()
            self.fp.seek(0)
            self.fp.write(final)
            self.fp.seek(end)
