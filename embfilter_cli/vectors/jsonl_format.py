"""JSON Lines in and out: one object per line, the vector in one field, every other field kept.

JSONL is parsed line by line; every field other than the vector passes through (re-serialised
compactly, same values, same key order). JSON numbers are doubles, so a JSONL input is float64.
JSONL output writes float64 values as the shortest round-trip decimal, float32 with 9 and float16
with 5 significant digits (enough to round-trip exactly).

Not handled: compressed JSONL, JSON arrays of vectors (one object per line only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from embfilter_cli.errors import InputDataError
from embfilter_cli.jsonable import loads
from embfilter_cli.vectors.base import (
    Batch,
    Passthrough,
    SourceOptions,
    VectorFormat,
    VectorSink,
    VectorSource,
)
from embfilter_cli.vectors.dtypes import bfloat16_to_float32, float32_to_bfloat16

JSONL_BATCH_ROWS = 1024  # each parsed line briefly holds Python floats (32 bytes each): keep batches small
_JSONL_DIGITS = {"float32": 9, "float16": 5, "bfloat16": 4}


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

    def _vector(self, record: Any, number: int, good_before: bool, maybe_bool: bool = True) -> np.ndarray:
        where = f"{self.name} line {number}"
        if not isinstance(record, dict):
            raise InputDataError(
                f"{where} is a JSON {_json_kind(record)}, not an object; "
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
        if vec.dtype == object and vec.ndim == 1 and all(_is_float(v) for v in value):
            vec = np.asarray(value, dtype=np.float64)  # whole numbers past int64 mixed with negatives
        # numpy reads true/false as 1/0 next to numbers: only scan for them when the line holds one
        if vec.ndim != 1 or vec.dtype.kind not in "iuf" or (maybe_bool and any(isinstance(v, bool) for v in value)):
            bad = next((i for i, v in enumerate(value) if not _is_float(v)), 0)
            big = isinstance(value[bad], int) and not isinstance(value[bad], bool)
            what = " (a number too large for a float)" if big else ""
            raise InputDataError(
                f"{where}: field {self.field!r} holds {json.dumps(value[bad])[:40]} at position {bad}{what}; "
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
        """Batches of vectors parsed from the records, with the records kept for the sink."""
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
                record = loads(raw.rstrip(b"\r\n"))  # so error columns refer to this line
            except UnicodeDecodeError as exc:
                raise InputDataError(
                    f"{self.name} line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            except json.JSONDecodeError as exc:
                raise InputDataError(
                    f"{self.name} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line"
                ) from None
            maybe_bool = b"true" in raw or b"false" in raw
            buf[len(records)] = self._vector(record, number, good_before=row > 0, maybe_bool=maybe_bool)
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
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _is_float(value: Any) -> bool:
    """A JSON number that float64 can hold (a bool is not; a whole number past 1.8e308 is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


class JsonlSink(VectorSink):
    """One JSON object per line: the source's record with the vector replaced, or {field: vector}."""

    def __init__(self, fp: IO[bytes], field: str) -> None:
        self.fp, self.field = fp, field
        self._template = ""
        self.dtype = "float64"

    def begin(self, lead_shape: tuple[int, ...] | None, dim: int, dtype: str) -> None:
        """Prepare the number format for `dtype` and `dim` values per row."""
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
        """Write each record with its filtered vector in the vector field."""
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
        """Nothing to complete: every line is written as it comes."""
        pass


def _sniff(head: bytes) -> bool:
    return head.lstrip().startswith(b"{")


def _open_source(fp: IO[bytes], name: str, opts: SourceOptions) -> JsonlSource:
    size = opts.path.stat().st_size if opts.path is not None else None
    return JsonlSource(fp, name, opts.field, opts.expected_dim, opts.dim_context, size)


FORMAT = VectorFormat(
    name="jsonl",
    extensions=(".jsonl", ".ndjson"),
    open_source=_open_source,
    open_sink=lambda fp, opts: JsonlSink(fp, opts.field),
    sniff=_sniff,
    text=True,
    batch_rows=JSONL_BATCH_ROWS,
)
