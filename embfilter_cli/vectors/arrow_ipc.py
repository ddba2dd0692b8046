"""Arrow IPC (the stream format for pipes, the file format for `.arrow` files), by record batch.

The two IPC formats are told apart by their first bytes: the file format starts with `ARROW1`,
the stream format with a message (the 0xFFFFFFFF continuation marker). Both are read batch by
batch; a file is memory-mapped. Outputs use the stream format on a pipe and the file format for a
named file (random access: `--shard` and `--resume` read its batch counts and schema cheaply).

Not handled: compressed IPC buffers written without pyarrow's codecs, dictionary-encoded vector
columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import IO, Any

import pyarrow as pa

from embfilter_cli.errors import InputDataError

IPC_FILE_MAGIC = b"ARROW1"
IPC_STREAM_MARKER = b"\xff\xff\xff\xff"


def sniff_arrow(head: bytes) -> str | None:
    """ "file" or "stream" when the bytes start an Arrow IPC file or stream, else None."""
    if head.startswith(IPC_FILE_MAGIC):
        return "file"
    if head.startswith(IPC_STREAM_MARKER):
        return "stream"
    return None


def _damaged(name: str, exc: BaseException) -> InputDataError:
    detail = " ".join(str(exc).split())
    return InputDataError(
        f"{name} is not a readable Arrow IPC file or stream ({type(exc).__name__}: {detail}); it is truncated "
        "or damaged: recreate it"
    )


class IpcInput:
    """An Arrow IPC file (memory-mapped, random access) or stream, as record batches.

    A stream saved to a file is memory-mapped too and read again for each pass, so it has parts
    (record batches) like a file, counted by one pass over its messages (no data is copied): a
    shard of it takes its block of batches as for the file format. A stream on a pipe is read once,
    whole.
    """

    def __init__(self, source: str | os.PathLike[str] | IO[bytes], name: str) -> None:
        self.name = name
        self._file: Any = None
        self._stream: Any = None
        self._path: str | None = None
        self._batch_rows: list[int] | None = None
        try:
            if isinstance(source, (str, os.PathLike)):
                with open(source, "rb") as fp:
                    head = fp.read(8)
                if sniff_arrow(head) == "file":
                    self._file = pa.ipc.open_file(pa.memory_map(str(source)))
                else:
                    self._path = str(source)
                    self._stream = pa.ipc.open_stream(pa.memory_map(self._path))
            else:
                self._stream = pa.ipc.open_stream(pa.PythonFile(source, mode="r"))
        except (pa.ArrowException, OSError) as exc:
            raise _damaged(name, exc) from None
        self.schema: pa.Schema = (self._file or self._stream).schema

    def _stream_rows(self) -> list[int]:
        """Rows of each record batch of a stream saved to a file (one pass, cached)."""
        if self._batch_rows is None:
            self._batch_rows = [batch.num_rows for batch in self._read_stream()]
        return self._batch_rows

    def _read_stream(self) -> Iterator[pa.RecordBatch]:
        """The stream's record batches, from the start (a fresh reader on a saved stream)."""
        reader = self._stream if self._path is None else pa.ipc.open_stream(pa.memory_map(self._path))
        try:
            yield from reader
        except (pa.ArrowException, OSError) as exc:
            raise _damaged(self.name, exc) from None

    @property
    def parts(self) -> int | None:
        """Record batches (None for a stream on a pipe, where they are not known in advance)."""
        if self._file is not None:
            return int(self._file.num_record_batches)
        return None if self._path is None else len(self._stream_rows())

    def rows(self, parts: Sequence[int] | None = None) -> int | None:
        """Rows in the chosen record batches, or None for a stream on a pipe (unknown until read)."""
        if self._file is None:
            if self._path is None:
                return None
            counts = self._stream_rows()
            return sum(counts[i] for i in (range(len(counts)) if parts is None else parts))
        chosen = range(self._file.num_record_batches) if parts is None else parts
        try:
            return sum(self._file.get_batch(i).num_rows for i in chosen)
        except (pa.ArrowException, OSError) as exc:
            raise _damaged(self.name, exc) from None

    def batches(self, batch_rows: int, parts: Sequence[int] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches in order (only the chosen ones), each cut to at most `batch_rows` rows."""
        wanted = None if parts is None else set(parts)
        try:
            if self._file is not None:
                chosen = range(self._file.num_record_batches) if parts is None else parts
                source: Iterator[pa.RecordBatch] = (self._file.get_batch(i) for i in chosen)
            else:
                source = (b for i, b in enumerate(self._read_stream()) if wanted is None or i in wanted)
            for batch in source:
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise _damaged(self.name, exc) from None


def ipc_footer(path: str | os.PathLike[str]) -> tuple[int, dict[str, str]]:
    """(row count, schema metadata) of an Arrow IPC file."""
    reader = IpcInput(path, str(path))
    rows = reader.rows() or 0
    meta = {
        k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in (reader.schema.metadata or {}).items()
    }
    return rows, meta


class IpcSink:
    """Write record batches as an Arrow IPC file (`file_format`) or stream."""

    def __init__(self, where: Any, schema: pa.Schema, file_format: bool) -> None:
        self.schema = schema
        self._sink = where if not isinstance(where, (str, os.PathLike)) else pa.OSFile(str(where), "wb")
        self._owns = isinstance(where, (str, os.PathLike))
        opener = pa.ipc.new_file if file_format else pa.ipc.new_stream
        self._writer = opener(self._sink, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        """Append one record batch."""
        self._writer.write_batch(batch)

    def close(self) -> None:
        """Finish the IPC file (and close the output when this sink opened it)."""
        self._writer.close()
        if self._owns:
            self._sink.close()
