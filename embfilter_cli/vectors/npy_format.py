"""`.npy` arrays in and out (C order; float16, float32 or float64).

Not handled: integer or complex vectors, structured dtypes, Fortran-ordered .npy files larger than
memory (they are read whole: np.save writes C order unless asked otherwise), .npz archives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from embfilter_cli.errors import InputDataError
from embfilter_cli.vectors.base import Batch, Passthrough, VectorFormat, VectorSource
from embfilter_cli.vectors.dtypes import as_float, float_dtype_name
from embfilter_cli.vectors.rawmatrix import BinarySink, RawMatrix

_MAX_ELEMENTS = 1 << 48  # beyond any real array: a header claiming more is damaged
_MAX_FORTRAN_STREAM = 8 << 30  # a Fortran-order array from a pipe is read whole: cap the allocation


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
        name_of = float_dtype_name(dtype)
        if name_of is None:
            raise InputDataError(
                f"{name} holds {dtype} values; embfilter reads float16, float32 or float64 vectors "
                "(convert with x.astype('float32'))"
            )
        self.dtype = name_of
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape) or math.prod(shape) > _MAX_ELEMENTS:
            raise InputDataError(
                f"{name} has an impossible .npy shape {list(shape)}; the header is damaged, recreate it"
            )
        if len(shape) == 0:
            raise InputDataError(f"{name} holds a single number, not vectors; save a (rows, dim) array")
        if shape == (0,):
            shape = (0, 0)  # np.save(np.array([])): an empty input, dimension unknown
        self.lead_shape, self.dim = shape[:-1], shape[-1]
        self._fortran_whole: np.ndarray | None = None
        if fortran and len(shape) > 1 and math.prod(shape) > 0:
            # Column-major rows are scattered over the whole file, so they cannot be streamed by rows.
            nbytes = math.prod(shape) * dtype.itemsize
            available = (path.stat().st_size - fp.tell()) if path is not None else _MAX_FORTRAN_STREAM
            if nbytes > available:
                raise InputDataError(
                    f"{name}: its Fortran-order .npy header promises {nbytes} data bytes but "
                    f"{'the file holds fewer' if path is not None else 'a stream may hold at most 8 GiB'}; "
                    "recreate it (C order streams by rows: np.ascontiguousarray)"
                )
            data = fp.read(nbytes)
            if len(data) < nbytes:
                raise InputDataError(
                    f"{name} is truncated: its .npy header promises {nbytes} data bytes, found {len(data)}"
                )
            whole = np.frombuffer(data, dtype=dtype).reshape(shape, order="F")
            self._fortran_whole = np.ascontiguousarray(whole).reshape(-1, self.dim)
            self._matrix = None
        else:
            self._matrix = RawMatrix(
                fp, path, offset, math.prod(self.lead_shape), self.dim, dtype, name, "its .npy header"
            )
        self.progress_total = self.rows

    def items(self, batch_rows: int, passthrough: bool = False) -> Iterator[Batch | Passthrough]:
        """Batches of rows in file order (memory-mapped for files, read in chunks for streams)."""
        if self._fortran_whole is not None:
            for start in range(0, len(self._fortran_whole), batch_rows):
                chunk = self._fortran_whole[start : start + batch_rows]
                yield Batch(start, as_float(chunk, self.dtype), start + len(chunk))
            return
        assert self._matrix is not None
        for start, chunk in self._matrix.batches(batch_rows):
            yield Batch(start, as_float(chunk, self.dtype), start + len(chunk))

    def close(self) -> None:
        """Release the memory map, if any."""
        if self._matrix is not None:
            self._matrix.close()


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...], min_len: int = 0) -> bytes:
    """A version 1.0 .npy header for a C-order array, padded (64-byte aligned) to at least `min_len` bytes."""
    text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.encode("latin1")
    size = 10 + len(body) + 1
    total = max(-(-size // 64) * 64, min_len)
    body += b" " * (total - size) + b"\n"
    return b"\x93NUMPY\x01\x00" + (len(body)).to_bytes(2, "little") + body


class NpySink(BinarySink):
    """A C-order .npy array (n, …, k)."""

    def _header(self, lead_shape: tuple[int, ...], min_len: int = 0) -> bytes:
        return npy_header(np.dtype(self.dtype), (*tuple(lead_shape), self.dim), min_len)


def _sniff(head: bytes) -> bool:
    return head.startswith(b"\x93NUMPY")


FORMAT = VectorFormat(
    name="npy",
    extensions=(".npy",),
    open_source=lambda fp, name, opts: NpySource(fp, name, opts.path),
    open_sink=lambda fp, opts: NpySink(fp, opts.seekable),
    sniff=_sniff,
)
