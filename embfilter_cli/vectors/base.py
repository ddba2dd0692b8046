"""What every vector format provides: a Source that hands out batches, a Sink that writes them.

Stored embedding vectors flow `Source → filter_stream (vectors/stream.py) → Sink`, one batch at a
time, so memory stays bounded by the batch size, never by the file. A format is one module
(`npy_format`, `jsonl_format`, `safetensors_format`) that implements the two protocols below and
describes itself with a `VectorFormat`; `registry.py` lists the formats, `detect.py` picks one from
a file name or the first bytes.

Adding a format (Parquet, Arrow, …):
1. write `vectors/<name>_format.py` with a source class and a sink class (subclass `VectorSource`
   and `VectorSink` for the shared defaults, or implement `Source` / `Sink` directly);
2. give it `FORMAT = VectorFormat(name=..., extensions=..., open_source=..., open_sink=..., sniff=...)`;
3. add that `FORMAT` to `registry.REGISTRY` (and the name to the CLI's mirror in `commands/apply.py`).

Arrays of any rank are accepted: the filter acts on the last axis, so a (n, seq, d) array gives
(n, seq, k). Rows are numbered from 0 in messages; JSONL lines from 1, as in editors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

DEFAULT_BATCH_ROWS = 8192

ProgressFn = Callable[[int, int | None], None]  # (units done, units total or None); rows, or bytes for JSONL


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


class Source(Protocol):
    """A reader of stored vectors. Attributes are known after opening (`dim` may come with the first batch)."""

    format: str  # the registry name, e.g. "npy"
    name: str  # the path, or "stdin", for messages
    lead_shape: tuple[int, ...] | None  # shape without the last axis; None when unknown (JSONL)
    dim: int | None  # last-axis length; None until known
    dtype: str  # the stored dtype's name (one of dtypes.DTYPE_NAMES)
    progress_total: int | None  # progress units in the whole input (rows, or bytes), None if unknown
    metadata: dict[str, str]  # the file's own string metadata, kept by sinks that can store it

    @property
    def rows(self) -> int | None:
        """How many vectors the input holds, None when unknown before reading."""
        ...

    def items(self, batch_rows: int, passthrough: bool = False) -> Iterator[Batch | Passthrough]:
        """Batches of rows (and, when `passthrough`, the bytes of other tensors) in input order."""
        ...

    def where(self, batch: Batch, i: int) -> str:
        """Human words for row `i` of `batch` ("line 7", "row 12", "vector (3, 4)")."""
        ...

    def close(self) -> None:
        """Release file handles and mappings."""
        ...


class Sink(Protocol):
    """A writer of filtered vectors: `begin` once, `write` per batch (`passthrough` between), `finish` once."""

    wants_passthrough: bool  # True: the source should also hand out the tensors that are not filtered

    def begin(self, lead_shape: tuple[int, ...] | None, dim: int, dtype: str) -> None:
        """Start the output: the shape without the last axis (None if unknown), the output dim and dtype."""
        ...

    def write(self, vectors: np.ndarray, batch: Batch) -> None:
        """Write the filtered rows of `batch` (its records/lines locate them in the input)."""
        ...

    def passthrough(self, item: Passthrough) -> None:
        """Raw bytes of an unfiltered tensor, in input order (only when `wants_passthrough`)."""
        ...

    def finish(self) -> None:
        """Complete the output (patch or write headers that needed the row count)."""
        ...


class VectorSource:
    """Shared defaults for `Source` implementations; subclasses set the attributes in `__init__`."""

    format: str = ""
    name: str = ""  # the path, or "stdin", for messages
    lead_shape: tuple[int, ...] | None = None  # shape without the last axis; None when unknown (JSONL)
    dim: int | None = None  # last-axis length; None until known
    dtype: str = "float32"  # the stored dtype's name
    progress_total: int | None = None
    metadata: dict[str, str] = {}  # noqa: RUF012 - read-only default; a source with metadata sets its own

    @property
    def rows(self) -> int | None:
        """How many vectors the input holds, None when unknown before reading."""
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


class VectorSink:
    """Shared defaults for `Sink` implementations. `begin` once, `write` per batch, `finish` once."""

    wants_passthrough = False

    def begin(self, lead_shape: tuple[int, ...] | None, dim: int, dtype: str) -> None:
        """Start the output: the shape without the last axis (None if unknown), the output dim and dtype."""
        raise NotImplementedError

    def write(self, vectors: np.ndarray, batch: Batch) -> None:
        """Write the filtered rows of `batch`."""
        raise NotImplementedError

    def passthrough(self, item: Passthrough) -> None:
        """Raw bytes of an unfiltered tensor (only safetensors keeps them)."""

    def finish(self) -> None:
        """Complete the output."""
        raise NotImplementedError


@dataclass
class SourceOptions:
    """What opening a source may need; each format reads the fields that apply to it."""

    path: Path | None = None  # the file, when the input is one (it can be mapped); None for a stream
    field: str = "embedding"  # JSONL (and other record formats): the field holding the vector
    tensor: str | None = None  # safetensors: the tensor to filter (None: the only 2-D float tensor)
    expected_dim: int = 0  # the filter's input dimension
    dim_context: str = ""  # words for a dimension mismatch, e.g. "the filter expects 576 (fitted on X)"


@dataclass
class SinkOptions:
    """What opening a sink may need; each format reads the fields that apply to it."""

    seekable: bool  # a file (headers can be patched at the end) rather than a pipe
    source: Source  # the input, for formats that copy its layout or metadata
    field: str = "embedding"  # JSONL: the field to write the vector to
    tensor: str | None = None  # safetensors: the tensor name to write when the input has none
    metadata: dict[str, str] = dataclasses.field(
        default_factory=dict
    )  # extra string metadata (the filter's provenance)


@dataclass(frozen=True)
class VectorFormat:
    """One stored-vector format, as the registry and format detection see it."""

    name: str
    extensions: tuple[str, ...]  # lower-case, with the dot
    open_source: Callable[[IO[bytes], str, SourceOptions], Source]  # (fp, name for messages, options)
    open_sink: Callable[[IO[bytes], SinkOptions], Sink]
    sniff: Callable[[bytes], bool]  # does a stream starting with these (≥ 16) bytes look like this format?
    text: bool = False  # text formats are sniffed after binary ones: their first bytes say the least
    batch_rows: int = DEFAULT_BATCH_ROWS  # default rows per batch
