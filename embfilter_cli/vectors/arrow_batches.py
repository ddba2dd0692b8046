"""Filter the vector column of Arrow record batches: the piece every table path shares.

`FilterBatch` is a picklable callable: an Arrow `RecordBatch` (or `Table`) in, the same columns in
the same order out, with the vector column replaced (same name) by `fixed_size_list<float32>[k]`
(or `dtype`). The local Parquet/Arrow streaming (`vectors.tables`), the Ray engine (`map_batches`)
and the Spark function (`mapInArrow`) all call it, so the three give identical values. The filter
goes through `FilterArtifact.apply`, so whatever the artifact's own map is (a projection, or later
an affine map) is honoured here too.

The vector column is `column` if given, else `embedding`, `embeddings` or `vector`, else the only
column of float lists. `list`, `large_list` and `fixed_size_list` of float16/32/64 are read.

Not handled: vectors nested deeper than one list level, integer vectors, Arrow's own tensor
extension types (Ray's `ArrowTensorType`): store plain (fixed-size) lists of floats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embfilter_cli.errors import InputDataError
from embfilter_cli.filters.finite import project_rows, unit_rows
from embfilter_cli.signals import raise_if_signalled

VECTOR_COLUMN_NAMES = ("embedding", "embeddings", "vector")
ARROW_DTYPES = ("float16", "float32", "float64")
_PA_TYPES = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}
META_PREFIX = "embfilter."


def is_vector_type(kind: pa.DataType) -> bool:
    """True for list / large_list / fixed_size_list of float16, float32 or float64."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return pa.types.is_floating(kind.value_type)
    return False


def describe_columns(schema: pa.Schema) -> str:
    """`id int64, emb list<float>` …, for messages that list what a file holds."""
    return ", ".join(f"{f.name} {_type_words(f.type)}" for f in schema) or "no columns"


def _type_words(kind: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(kind):
        return f"fixed_size_list<{kind.value_type}>[{kind.list_size}]"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"{'large_' if pa.types.is_large_list(kind) else ''}list<{kind.value_type}>"
    return str(kind)


def require_unique_column(schema: pa.Schema, column: str, name: str) -> None:
    """Refuse a column name that several columns share: pyarrow cannot pick one (`schema.field` raises)."""
    count = len(schema.get_all_field_indices(column))
    if count > 1:
        raise InputDataError(
            f"{name} has {count} columns named {column!r} (its columns: {describe_columns(schema)}); "
            "rename them so the column is unique"
        )


def find_vector_column(schema: pa.Schema, column: str | None, name: str) -> str:
    """The name of the vector column of `schema` (see the module docstring for the rule).

    Raises:
        InputDataError: no such column, not a float-list column, or no/several candidates; the message
            lists the columns and their types.
    """
    names = schema.names
    if column is not None:
        if column not in names:
            raise InputDataError(
                f"{name} has no column {column!r} (its columns: {describe_columns(schema)}); pass --column NAME"
            )
        chosen = column
    else:
        preferred = [n for n in VECTOR_COLUMN_NAMES if n in names]
        if preferred:
            chosen = preferred[0]
        else:
            candidates = [f.name for f in schema if is_vector_type(f.type)]
            if len(candidates) != 1:
                how = "several" if candidates else "no"
                raise InputDataError(
                    f"{name} has {how} columns of float lists and none named {', '.join(VECTOR_COLUMN_NAMES)} "
                    f"(its columns: {describe_columns(schema)}); pass --column NAME"
                )
            chosen = candidates[0]
    require_unique_column(schema, chosen, name)
    kind = schema.field(chosen).type
    if not is_vector_type(kind):
        raise InputDataError(
            f"{name}: column {chosen!r} is {_type_words(kind)}, not a list of floats "
            f"(its columns: {describe_columns(schema)}); pass --column NAME for the vector column"
        )
    return chosen


def fingerprint_metadata(artifact: Any, normalize: bool, column: str) -> dict[str, str]:
    """The `embfilter.*` keys an output carries so `embfilter verify --vectors` can tell its filter."""
    return {
        "embfilter.projection_sha256": artifact.metadata.get("projection_sha256", ""),
        "embfilter.model_source": artifact.model_source,
        "embfilter.unembedding_sha256": artifact.unembedding_sha256,
        "embfilter.band": json.dumps(artifact.band, sort_keys=True) if "band" in artifact.metadata else "",
        "embfilter.mean_sha256": artifact.metadata.get("mean_sha256", ""),  # empty: an uncentred filter
        "embfilter.normalized": "true" if normalize else "false",
        "embfilter.column": column,
    }


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Which rows hold only finite values, at the cost of one row sum (no (m, d) temporary)."""
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.isfinite(x.sum(axis=1))
    if not ok.all():
        suspect = np.flatnonzero(~ok)
        ok[suspect] = np.isfinite(x[suspect]).all(axis=1)
    return ok


def column_vectors(
    array: pa.Array | pa.ChunkedArray,
    dim: int,
    *,
    name: str,
    column: str,
    row_offset: int = 0,
    allow_null: bool = False,
    dim_context: str = "",
) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows of a float-list column as an (m, dim) array, plus which rows were valid.

    Returns `(x, valid)`: `x` holds only the valid rows; `valid` is None when every row is.
    A row is invalid when it is null or holds a null value; that is an error unless `allow_null`.

    Raises:
        InputDataError: a null (without `allow_null`) or a vector whose length is not `dim`,
            naming `name` and the row (`row_offset` + index in the array, 0-based).
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    n = len(array)
    bad = np.zeros(n, dtype=bool)
    if array.null_count:
        bad |= np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    values = array.flatten()  # drops null rows' values (list and fixed-size list alike)
    if values.null_count:
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        null_at = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        bad[np.unique(parents[null_at])] = True
    if bad.any() and not allow_null:
        row = int(np.flatnonzero(bad)[0])
        what = "is null" if array[row].as_py() is None else "holds a null value"
        raise InputDataError(
            f"{name} row {row_offset + row}: the vector in column {column!r} {what}; clean the input or pass "
            "--allow-null to keep such rows null in the output"
        )
    if pa.types.is_fixed_size_list(array.type):
        length = array.type.list_size
        if length != dim:
            first = int(np.flatnonzero(~bad)[0]) if (~bad).any() else None
            if first is not None:
                _wrong_dim(name, row_offset + first, column, length, dim, dim_context)
    else:
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        lengths = np.where(bad, dim, np.nan_to_num(lengths.astype(np.float64), nan=dim)).astype(np.int64)
        wrong = np.flatnonzero(lengths != dim)
        if len(wrong):
            row = int(wrong[0])
            _wrong_dim(name, row_offset + row, column, int(lengths[row]), dim, dim_context)
    if bad.any():
        values = array.filter(pa.array(~bad)).flatten()
    x = values.to_numpy(zero_copy_only=False).reshape(-1, dim) if len(values) else np.empty((0, dim), np.float32)
    return x, (None if not bad.any() else ~bad)


def _wrong_dim(name: str, row: int, column: str, length: int, dim: int, dim_context: str) -> None:
    raise InputDataError(
        f"{name} row {row}: the vector in column {column!r} has {length} values but "
        f"{dim_context or f'{dim} are expected'}"
    )


def vector_array(y: np.ndarray, valid: np.ndarray | None, dtype: str) -> pa.FixedSizeListArray:
    """An Arrow `fixed_size_list<dtype>[k]` array from (m_valid, k) results; invalid rows become null."""
    k = y.shape[1]
    if valid is not None:
        full = np.zeros((len(valid), k), dtype=y.dtype)
        full[valid] = y
        y = full
    flat = pa.array(np.ascontiguousarray(y, dtype=np.dtype(dtype)).reshape(-1), type=_PA_TYPES[dtype])
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, k, mask=mask)


class FilterBatch:
    """Apply a filter to the vector column of Arrow batches: `FilterBatch(F)(batch) -> batch`.

    Picklable and lazy: built from a path it loads the artifact on first use, so a Ray actor or a
    Spark worker loads it once and the path (not the matrix) is what travels. Usable as a Ray Data
    `map_batches` callable class (`batch_format="pyarrow"`) and inside Spark's `mapInArrow`.

    Args:
        filter: the artifact's path, or a loaded `FilterArtifact`.
        column: the vector column; default as `find_vector_column`.
        dtype: float16, float32 (default) or float64 values in the output column.
        normalize: L2-normalise each filtered vector (all-zero results stay zero).
        allow_null: keep null vectors (or vectors holding nulls) as null rows instead of failing.
        allow_nonfinite: let NaN/Inf vectors through (their results are NaN/Inf) instead of failing.
    """

    def __init__(
        self,
        filter: str | os.PathLike[str] | Any,  # noqa: A002 - the public name users expect
        column: str | None = None,
        *,
        dtype: str = "float32",
        normalize: bool = False,
        allow_null: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        if dtype not in ARROW_DTYPES:
            raise ValueError(f"dtype must be one of {ARROW_DTYPES}, not {dtype!r}")
        if isinstance(filter, (str, os.PathLike)):
            self._path: Path | None = Path(filter)
            self._artifact: Any = None
        else:
            self._path, self._artifact = getattr(filter, "path", None), filter
        self.column, self.dtype, self.normalize = column, dtype, normalize
        self.allow_null, self.allow_nonfinite = allow_null, allow_nonfinite
        self.nonfinite_rows = 0
        self.null_rows = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_artifact"] = None  # ship the path; each worker loads the file once
        return state

    @property
    def artifact(self) -> Any:
        """The filter, loaded from its path on first use."""
        if self._artifact is None:
            from embfilter_cli.filters.artifact import load_artifact

            self._artifact = load_artifact(self._path)  # type: ignore[arg-type]
        return self._artifact

    @property
    def dim_context(self) -> str:
        """Words for a dimension mismatch: what the filter expects and the fix."""
        art = self.artifact
        return (
            f"the filter expects {art.hidden_size} (fitted on {art.model_source or 'another model'}); "
            "use a filter fitted on the model that produced these vectors"
        )

    def fingerprint(self) -> tuple[dict[str, str], dict[str, str]]:
        """(identity, settings) an output must record to count as this run's (see `shards.output_state`)."""
        meta = self.metadata(self.column or "")
        identity = {k: meta[k] for k in ("embfilter.projection_sha256", "embfilter.mean_sha256")}
        return identity, {"embfilter.normalized": meta["embfilter.normalized"]}

    def resume_options(self) -> dict[str, str]:
        """Options that decide an output's bytes beyond its `metadata` (kept in the resume record, `shards`)."""
        return {"dtype": self.dtype}

    def dims(self) -> tuple[int, int]:
        """(input dimension d, output dimension k)."""
        return self.artifact.hidden_size, self.artifact.output_dim

    def metadata(self, column: str) -> dict[str, str]:
        """The fingerprint keys for an output whose vector column is `column`."""
        return fingerprint_metadata(self.artifact, self.normalize, column)

    def output_schema(self, schema: pa.Schema, name: str = "input") -> pa.Schema:
        """`schema` with the vector column's type replaced and the fingerprints added to its metadata."""
        column = find_vector_column(schema, self.column, name)
        i = schema.get_field_index(column)
        old = schema.field(i)
        new = pa.field(column, pa.list_(_PA_TYPES[self.dtype], self.artifact.output_dim), old.nullable, old.metadata)
        meta = dict(schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in self.metadata(column).items()})
        return schema.set(i, new).with_metadata(meta)

    def __call__(self, batch: pa.RecordBatch | pa.Table, name: str = "batch", row_offset: int = 0) -> Any:
        """Filter one batch; `name` and `row_offset` only locate rows in error messages."""
        art = self.artifact
        column = find_vector_column(batch.schema, self.column, name)
        i = batch.schema.get_field_index(column)
        x, valid = column_vectors(
            batch.column(i),
            art.hidden_size,
            name=name,
            column=column,
            row_offset=row_offset,
            allow_null=self.allow_null,
            dim_context=self.dim_context,
        )
        if valid is not None:
            self.null_rows += int((~valid).sum())
        y = self.filter_matrix(x, name=name, row_offset=row_offset, valid=valid)
        old = batch.schema.field(i)
        field = pa.field(column, pa.list_(_PA_TYPES[self.dtype], art.output_dim), old.nullable, old.metadata)
        return batch.set_column(i, field, vector_array(y, valid, self.dtype))

    def filter_matrix(
        self, x: np.ndarray, name: str = "batch", row_offset: int = 0, valid: np.ndarray | None = None
    ) -> np.ndarray:
        """Filter an (m, d) array of vectors (checks, filter, normalisation, output dtype)."""
        raise_if_signalled()  # between batches: stop promptly even if a library swallowed the signal's exception
        if x.dtype != np.float64:
            x = x.astype(np.float32, copy=False)  # float16 is computed in float32, as everywhere else
        ok = finite_rows(x)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            if not self.allow_nonfinite:
                row = int(np.flatnonzero(valid)[bad]) if valid is not None else bad
                col = int(np.flatnonzero(~np.isfinite(x[bad]))[0])
                raise InputDataError(
                    f"{name} row {row_offset + row} has {x[bad, col]} at position {col}; clean the input or pass "
                    "--allow-nonfinite to let such rows through (their results are NaN/Inf)"
                )
            self.nonfinite_rows += int((~ok).sum())
        art = self.artifact
        y = project_rows(x, art.projection, art.mean, ok)  # float64 where float32 would overflow
        if self.normalize:
            y = unit_rows(y)
        with np.errstate(over="ignore"):
            out = y.astype(self.dtype, copy=False)
        over = ~finite_rows(out) & ok  # a finite input must give a finite output, never Inf/NaN with exit 0
        if over.any():
            bad = int(np.flatnonzero(over)[0])
            row = int(np.flatnonzero(valid)[bad]) if valid is not None else bad
            hint = (
                "float16's range (±65504); pass --dtype float32 or --normalize"
                if self.dtype == "float16"
                else f"{self.dtype}'s range; pass --normalize or --dtype float64, or scale the input"
            )
            raise InputDataError(f"{name} row {row_offset + row}: a filtered value exceeds {hint}")
        return out
