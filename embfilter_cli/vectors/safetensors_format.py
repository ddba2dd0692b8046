"""One tensor of a safetensors file filtered; the other tensors and the metadata pass through.

Header metadata is str → str (the format's rule); the sink adds the caller's string metadata (the
filter's provenance) after the input's own. bfloat16 is read and written as raw bit patterns.

Not handled: integer, bool or 8-bit float tensors as the filtered tensor (they can pass through).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from embfilter_cli.errors import InputDataError
from embfilter_cli.safetensors_header import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    SafetensorsHeaderError,
    TensorEntry,
    read_header,
)
from embfilter_cli.vectors.base import Batch, Passthrough, SinkOptions, VectorFormat, VectorSource
from embfilter_cli.vectors.dtypes import as_float, float32_to_bfloat16, storage_dtype
from embfilter_cli.vectors.rawmatrix import COPY_CHUNK, BinarySink, RawMatrix, skip_bytes

# safetensors dtype tag <-> our dtype names (bfloat16 is stored as raw uint16 bits in numpy)
_ST_TO_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_NAME_TO_ST = {v: k for k, v in _ST_TO_NAME.items()}


def read_safetensors_header(fp: IO[bytes], name: str) -> SafetensorsHeader:
    """Parse a safetensors header from the stream's start (the shared parser, with vector-input messages)."""
    try:
        return read_header(fp)
    except SafetensorsHeaderError as exc:
        n = exc.length
        if exc.problem == "short":
            raise InputDataError(
                f"{name} is not a safetensors file ({n} bytes, shorter than the 8-byte header length)"
            ) from None
        if exc.problem == "length":
            raise InputDataError(
                f"{name} is not a safetensors file (its first 8 bytes give a header length of {n}); "
                "pass --format npy or --format jsonl if it is one of those"
            ) from None
        if exc.problem == "json":
            raise InputDataError(
                f"{name} is not a safetensors file (its {n}-byte header is not a JSON object); recreate it"
            ) from None
        if exc.problem == "metadata":
            raise InputDataError(
                f"{name}: header __metadata__ is not an object of strings; recreate the file"
            ) from None
        if exc.problem == "range" and exc.entry is not None:
            e = exc.entry
            raise InputDataError(
                f"{name}: tensor {e.name!r} ({e.dtype} {list(e.shape)}) has byte range "
                f"[{e.begin}, {e.end}) that does not match its shape; recreate the file"
            ) from None
        if exc.problem == "overlap":
            before, after = exc.names
            raise InputDataError(f"{name}: tensors {before!r} and {after!r} overlap; the file is damaged") from None
        raise InputDataError(f"{name}: header entry {exc.names[0]!r} is malformed; recreate the file") from None


class SafetensorsSource(VectorSource):
    """One float tensor of a safetensors file or stream; the other tensors can pass through."""

    format = "safetensors"

    def __init__(self, fp: IO[bytes], name: str, path: Path | None = None, tensor: str | None = None) -> None:
        self.fp, self.name, self.path = fp, name, path
        header = read_safetensors_header(fp, name)
        self.metadata, self.entries, self.data_start = header.metadata, header.entries, header.data_start
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
        self._matrix = RawMatrix(
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
        """The target tensor's rows in batches and, with `passthrough`, the other tensors' bytes."""
        position = 0  # bytes consumed of the data section, for streams
        for entry in self.entries:
            if entry is self.target:
                if self.path is None and entry.begin > position:
                    skip_bytes(self.fp, entry.begin - position, self.name)
                for start, chunk in self._matrix.batches(batch_rows):
                    yield Batch(start, as_float(chunk, self.dtype), start + len(chunk))
                position = entry.end
                continue
            if not passthrough and self.path is not None:
                continue
            if self.path is None and entry.begin > position:
                skip_bytes(self.fp, entry.begin - position, self.name)
            if self.path is not None:
                self.fp.seek(self.data_start + entry.begin)
            left = entry.end - entry.begin
            while left:
                data = self.fp.read(min(left, COPY_CHUNK))
                if not data:
                    raise InputDataError(f"{self.name} ended inside tensor {entry.name!r}; the input is truncated")
                left -= len(data)
                if passthrough:
                    yield Passthrough(entry.name, data)
            position = entry.end

    def close(self) -> None:
        """Release the memory map, if any."""
        self._matrix.close()


class SafetensorsSink(BinarySink):
    """A safetensors file holding the filtered tensor, plus any passed-through tensors in input order."""

    wants_passthrough = True

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
        """Copy another tensor's bytes unchanged."""
        self._data().write(item.data)

    def write(self, vectors: np.ndarray, batch: Batch) -> None:
        """Append the filtered rows little-endian (bfloat16 as rounded bit patterns)."""
        if self.dtype == "bfloat16":
            vectors = float32_to_bfloat16(vectors)
        super().write(vectors.astype(vectors.dtype.newbyteorder("<"), copy=False), batch)


def _sniff(head: bytes) -> bool:
    """An 8-byte little-endian header length (at most the library's limit) followed by `{`."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES


def _open_sink(fp: IO[bytes], opts: SinkOptions) -> SafetensorsSink:
    """A sink that keeps a safetensors input's layout (other tensors, names) or writes one tensor."""
    metadata = dict(opts.source.metadata or {})
    metadata.update(opts.metadata)
    source = opts.source
    if isinstance(source, SafetensorsSource):
        return SafetensorsSink(fp, opts.seekable, source.target.name, metadata, source.entries, source.target)
    return SafetensorsSink(fp, opts.seekable, opts.tensor or "embeddings", metadata)


FORMAT = VectorFormat(
    name="safetensors",
    extensions=(".safetensors",),
    open_source=lambda fp, name, opts: SafetensorsSource(fp, name, opts.path, opts.tensor),
    open_sink=_open_sink,
    sniff=_sniff,
)
