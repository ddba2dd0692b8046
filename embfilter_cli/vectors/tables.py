"""Stream Parquet and Arrow tables through a filter, file by file, batch by batch.

`apply_tables` runs a planned list of `WorkUnit`s (see `vectors.shards`): each input is read by
record batch, every batch goes through a `FilterBatch` (the vector column replaced, every other
column passed through in order), and each output file is written atomically, so a killed or failed
run leaves only complete outputs (plus, after SIGKILL, temporary `.NAME.*.tmp` files that
`--resume` removes). `apply_ipc_stream` does the same for one Arrow IPC stream (pipes).

Memory is bounded by one batch (and one Parquet row group being decoded), never by the file or
the dataset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from embfilter_cli.errors import EmbfilterError
from embfilter_cli.files import atomic_path
from embfilter_cli.vectors.arrow_batches import FilterBatch
from embfilter_cli.vectors.shards import (
    RECORD_KEY,
    WorkUnit,
    check_folders_writable,
    check_outputs,
    output_state,
    remove_stale_temporaries,
)

DEFAULT_TABLE_BATCH_ROWS = 8192
ProgressFn = Callable[[int, int | None], None]


@dataclass
class TableStats:
    """What a table run did."""

    rows: int = 0
    files: int = 0
    skipped: list[str] = field(default_factory=list)
    redone: list[str] = field(default_factory=list)  # ours, but made with other options or inputs: redone
    outputs: list[str] = field(default_factory=list)
    input_dim: int = 0
    output_dim: int = 0
    output_dtype: str = "float32"
    seconds: float = 0.0
    nonfinite_rows: int = 0
    null_rows: int = 0

    @property
    def rows_per_second(self) -> float:
        """Throughput; infinite when no time was measured."""
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


class TableInput:
    """One Parquet or Arrow IPC file (or stream), as a schema and record batches."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.name, self.format = str(path), fmt
        if fmt == "parquet":
            from embfilter_cli.vectors.parquet import open_parquet, parquet_schema

            self._pq = open_parquet(path)
            self.schema = parquet_schema(self._pq, self.name)
            self._ipc = None
        else:
            from embfilter_cli.vectors.arrow_ipc import IpcInput

            self._pq = None
            self._ipc = IpcInput(path, self.name)
            self.schema = self._ipc.schema

    def part_count(self) -> int:
        """Row groups (Parquet) or record batches (Arrow file or saved stream)."""
        if self._pq is not None:
            return int(self._pq.metadata.num_row_groups)
        return self._ipc.parts or 0  # type: ignore[union-attr]

    def rows(self, parts: Sequence[int] | None = None) -> int:
        """Rows in the chosen parts (row groups or record batches) of the input."""
        if self._pq is not None:
            from embfilter_cli.vectors.parquet import parquet_rows

            return parquet_rows(self._pq, parts)
        rows = self._ipc.rows(parts)  # type: ignore[union-attr]
        return -1 if rows is None else rows

    def first_row(self, parts: Sequence[int] | None) -> int:
        """The file row number of the first row of `parts` (for messages)."""
        if not parts:
            return 0
        return self.rows(range(parts[0]))

    def batches(self, batch_rows: int, parts: Sequence[int] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of at most `batch_rows` rows from the chosen parts."""
        if self._pq is not None:
            from embfilter_cli.vectors.parquet import iter_parquet

            return iter_parquet(self._pq, self.name, batch_rows, parts)
        return self._ipc.batches(batch_rows, parts)  # type: ignore[union-attr]


def count_parts(path: Path, fmt: str) -> int:
    """Row groups / record batches of a file (for sharding a single file)."""
    return TableInput(path, fmt).part_count()


def make_sink(where: Any, fmt: str, schema: pa.Schema, file_format: bool = True) -> Any:
    """A Parquet or Arrow IPC writer on a path or stream."""
    if fmt == "parquet":
        from embfilter_cli.vectors.parquet import ParquetSink

        return ParquetSink(where, schema)
    from embfilter_cli.vectors.arrow_ipc import IpcSink

    return IpcSink(where, schema, file_format=file_format)


def filter_batches(
    batches: Iterator[pa.RecordBatch],
    sink_factory: Callable[[pa.Schema], Any],
    schema: pa.Schema,
    fb: Any,
    name: str,
    row_offset: int = 0,
    progress: Callable[[int], None] | None = None,
    record: str | None = None,
) -> int:
    """Filter every batch into a sink made for the output schema; returns the rows written.

    `record` is the unit's resume record (`WorkUnit.record`), kept in the output's metadata.
    """
    out_schema = _with_record(fb.output_schema(schema, name), record)
    sink = sink_factory(out_schema)
    rows = 0
    try:
        for batch in batches:
            out = fb(batch, name=name, row_offset=row_offset + rows)
            sink.write(out.replace_schema_metadata(out_schema.metadata))
            rows += batch.num_rows
            if progress is not None:
                progress(batch.num_rows)
    finally:
        sink.close()
    return rows


def _with_record(schema: pa.Schema, record: str | None) -> pa.Schema:
    if record is None:
        return schema
    return schema.with_metadata({**(schema.metadata or {}), RECORD_KEY.encode(): record.encode()})


def _resume_options(fn: Any) -> dict[str, Any]:
    return dict(fn.resume_options()) if hasattr(fn, "resume_options") else {}


def expected_metadata(unit: WorkUnit, fn: Any, batch_rows: int, table: TableInput) -> dict[str, str]:
    """Every `embfilter.*` key a fresh run writes into `unit`'s output (what a complete output must record)."""
    schema = _with_record(fn.output_schema(table.schema, table.name), unit.record(batch_rows, _resume_options(fn)))
    meta = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in (schema.metadata or {}).items()}
    return {k: v for k, v in meta.items() if k.startswith("embfilter.")}


def plan_states(units: Sequence[WorkUnit], fn: Any, batch_rows: int) -> dict[str, str]:
    """Each output's state (`shards.output_state`), against what this run would write.

    `fn` is a batch function (`FilterBatch`, `engines.embed_tables.EmbedBatch`) with `fingerprint()`.
    An input that cannot be planned against (no vector column, damaged) makes its existing output
    "incomplete": the run then redoes it and reports the input's own error.
    """
    identity, _ = fn.fingerprint()
    states = {}
    for unit in units:
        if not unit.output.exists():
            states[str(unit.output)] = "missing"
            continue
        try:
            table = TableInput(unit.input, unit.in_format)
            rows, expected = table.rows(unit.parts), expected_metadata(unit, fn, batch_rows, table)
        except (EmbfilterError, OSError):
            rows, expected = -1, {"embfilter.unplanned": "1"}
        states[str(unit.output)] = output_state(unit, rows, identity, expected)
    return states


def run_unit(
    unit: WorkUnit, fn: Any, batch_rows: int, resume: bool, progress: Callable[[int], None] | None = None
) -> int:
    """Stream one unit's input through `fn` into its output file, atomically; returns the rows written."""
    if resume:
        remove_stale_temporaries(unit.output)
    table = TableInput(unit.input, unit.in_format)
    with atomic_path(unit.output, force=True) as tmp:
        return filter_batches(
            table.batches(batch_rows, unit.parts),
            lambda schema: make_sink(tmp, unit.out_format, schema),
            table.schema,
            fn,
            table.name,
            row_offset=table.first_row(unit.parts),
            progress=progress,
            record=unit.record(batch_rows, _resume_options(fn)),
        )


def split_work(
    units: Sequence[WorkUnit], states: dict[str, str], stats: TableStats, force: bool, resume: bool
) -> list[WorkUnit]:
    """The units to run; complete outputs skipped on `resume` (noted in `stats`, with the stale ones redone)."""
    todo = []
    for unit in units:
        state = states[str(unit.output)]
        if resume and not force and state == "complete":
            stats.skipped.append(str(unit.output))
            continue
        if resume and state == "stale":
            stats.redone.append(str(unit.output))
        todo.append(unit)
    return todo


def apply_tables(
    units: Sequence[WorkUnit],
    fb: Any,
    *,
    batch_rows: int = DEFAULT_TABLE_BATCH_ROWS,
    force: bool = False,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> TableStats:
    """Run every unit's input through `fb` into its output file (atomically), skipping complete outputs on `resume`.

    `fb` is a batch function: `FilterBatch`, or `engines.embed_tables.EmbedBatch`.

    Every output is checked before any work starts. On an error the outputs already finished
    are kept (a rerun with `resume` continues) and the failing one leaves nothing behind.

    Raises:
        OutputExistsError: an output exists and neither `force` nor (for our own outputs) `resume` allows it.
        InputDataError: a damaged input or bad vectors, naming the file and row.
    """
    started = time.perf_counter()
    check_folders_writable(units)
    states = plan_states(units, fb, batch_rows)
    check_outputs(states, units, force, resume)
    d, k = fb.dims()
    stats = TableStats(output_dim=k, input_dim=d, output_dtype=getattr(fb, "dtype", "float32"))
    todo = split_work(units, states, stats, force, resume)
    inputs = {str(u.input): TableInput(u.input, u.in_format) for u in todo}
    total = sum(inputs[str(u.input)].rows(u.parts) for u in todo)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for unit in todo:
        stats.rows += run_unit(unit, fb, batch_rows, resume, step)
        stats.files += 1
        stats.outputs.append(str(unit.output))
    stats.nonfinite_rows = getattr(fb, "nonfinite_rows", 0)
    stats.null_rows = getattr(fb, "null_rows", getattr(fb, "null_texts", 0))
    stats.seconds = time.perf_counter() - started
    return stats


def apply_ipc_stream(
    source: IO[bytes], sink: IO[bytes], fb: FilterBatch, *, batch_rows: int = DEFAULT_TABLE_BATCH_ROWS
) -> TableStats:
    """Filter one Arrow IPC stream (e.g. stdin) into an Arrow IPC stream (e.g. stdout), batch by batch."""
    from embfilter_cli.vectors.arrow_ipc import IpcInput

    started = time.perf_counter()
    reader = IpcInput(source, "stdin")
    out = pa.PythonFile(sink, mode="w")
    rows = filter_batches(
        reader.batches(batch_rows),
        lambda schema: make_sink(out, "arrow", schema, file_format=False),
        reader.schema,
        fb,
        "stdin",
    )
    out.flush()
    return TableStats(
        rows=rows,
        files=1,
        input_dim=fb.artifact.hidden_size,
        output_dim=fb.artifact.output_dim,
        output_dtype=fb.dtype,
        seconds=time.perf_counter() - started,
        nonfinite_rows=fb.nonfinite_rows,
        null_rows=fb.null_rows,
    )
