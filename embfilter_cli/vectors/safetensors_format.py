"""One tensor of a safetensors file filtered; the other tensors and the metadata pass through.

Header metadata is str → str (the format's rule); the sink adds the caller's string metadata (the
filter's provenance) after the input's own. bfloat16 is read and written as raw bit patterns.

Not handled: integer, bool or 8-bit float tensors as the filtered tensor (they can pass through).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from embfilter_cli.errors import InputDataError
from embfilter_cli.vectors.base import Batch, Passthrough, SinkOptions, VectorFormat, VectorSource
from embfilter_cli.vectors.dtypes import as_float, float32_to_bfloat16, storage_dtype
from embfilter_cli.vectors.rawmatrix import COPY_CHUNK, BinarySink, RawMatrix, skip_bytes

SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit
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


@dataclass
class TensorEntry:
    """One tensor of a safetensors header."""

    name: str
    dtype: str  # safetensors tag, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int


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
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER


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
