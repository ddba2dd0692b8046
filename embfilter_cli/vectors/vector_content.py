"""What a file of filtered vectors proves about itself, beyond the `embfilter.*` metadata it carries.

Metadata can be copied: a file of raw vectors, or a table with no vector column at all, given the
schema metadata of a real output, names the filter as well as the real output does. So
`embfilter verify F --vectors PATH` also reads every vector and checks what the data proves:

- the vector column exists (a table: the column its `embfilter.column` names, else `embedding`,
  `embeddings` or `vector`; safetensors: the 2-D float tensor, or the one `k` wide when there are
  several) and holds float vectors (float16, float32, float64; bfloat16 in safetensors);
- every vector has the filter's output width k; raw vectors have the model's hidden size d, so
  this tells them apart for every reduced filter (k < d);
- the rows add up: the rows read equal the rows the file's footer or header declares;
- `embfilter.normalized` is "true": every vector has unit length (or is all zero, which the
  filter's normalisation keeps), within the stored dtype's precision;
- a projector filter (`--no-reduce`, k = d): every vector lies in the kept subspace (its part
  along the removed directions is at most `SUBSPACE_TOL` of its length); raw vectors do not.

Not provable from the file: for a reduced filter, any k-wide vectors are some vectors' image, so
vectors of the right width filtered by another filter with a forged fingerprint pass (compare
them with a fresh `apply` of the inputs for that); whether a centred filter's mean was
subtracted; NaN/Inf rows (`--allow-nonfinite` outputs) and null rows are skipped, not judged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from embfilter_cli.errors import InputDataError

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact

BATCH_ROWS = 8192
# |‖y‖ − 1| allowed for a normalised vector stored in each dtype: 16-bit floats round each value
# by up to 2⁻⁸ (bfloat16) relative; 32/64-bit outputs are computed in float32 (error ~1e-6 at k=4096).
NORM_TOL = {"float16": 2e-2, "bfloat16": 2e-2, "float32": 1e-4, "float64": 1e-4}
# Largest ‖R y‖ / ‖y‖ of a projector's output (R: the removed directions): float32 rounding gives
# ~1e-6, float16 storage ~1e-3; raw vectors are of order 1 (the removed directions carry the most).
SUBSPACE_TOL = {"float16": 5e-2, "bfloat16": 5e-2, "float32": 1e-3, "float64": 1e-3}


def content_problem(artifact: FilterArtifact, path: Path, declared_rows: int, meta: dict[str, str]) -> str | None:
    """Why the vectors in `path` cannot be `artifact`'s output (one line), or None when the data agrees.

    Args:
        declared_rows: the row count of the file's footer/header (`fingerprints.read_fingerprint`).
        meta: the file's string metadata (`embfilter.column`, `embfilter.normalized`).
    """
    try:
        dtype, batches = _vectors(path, artifact, meta)
        rows = 0
        normalized = meta.get("embfilter.normalized") == "true"
        removed = None if artifact.reduced else artifact.removed_directions.astype(np.float64)
        for x in batches:
            problem = _batch_problem(x, rows, dtype, normalized, removed)
            if problem:
                return f"{path} {problem}; it was not written by this filter (its metadata was copied or edited)"
            rows += len(x)
    except InputDataError as exc:
        return f"{exc}; it was not written by this filter (its metadata was copied or edited)"
    if declared_rows >= 0 and rows != declared_rows:
        return f"{path} declares {declared_rows} rows but holds {rows} vectors; the file is damaged, recreate it"
    return None


def _batch_problem(
    x: np.ndarray, first_row: int, dtype: str, normalized: bool, removed: np.ndarray | None
) -> str | None:
    """What rows `first_row`… of one batch (only valid rows, as float) say against the filter."""
    x64 = x.astype(np.float64)
    ok = np.asarray(np.isfinite(x64).all(axis=1))
    finite = np.where(ok[:, None], x64, 0.0)  # NaN/Inf rows (`--allow-nonfinite` outputs) are not judged
    norms = np.sqrt(np.einsum("ij,ij->i", finite, finite))
    if normalized:
        bad = ok & (norms != 0) & (np.abs(norms - 1) > NORM_TOL[dtype])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return (
                f"row {first_row + i} has length {norms[i]:.6g} although its metadata says the vectors were "
                f"normalised (|length − 1| ≤ {NORM_TOL[dtype]:g} for {dtype})"
            )
    if removed is not None and removed.shape[0]:
        off = np.linalg.norm(finite @ removed.T, axis=1)
        bad = ok & (off > SUBSPACE_TOL[dtype] * np.maximum(norms, np.finfo(np.float32).tiny))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return (
                f"row {first_row + i} is not in this filter's kept subspace (its part along the removed directions "
                f"is {off[i] / norms[i]:.3g} of its length, > {SUBSPACE_TOL[dtype]:g})"
            )
    return None


def _width_words(artifact: FilterArtifact) -> str:
    k, d = artifact.output_dim, artifact.hidden_size
    raw = f"; the model's raw vectors have {d}" if k != d else ""
    return f"this filter outputs {k}{raw}"


def _vectors(path: Path, artifact: FilterArtifact, meta: dict[str, str]) -> tuple[str, Iterator[np.ndarray]]:
    """(the stored dtype's name, the valid vectors in batches), after checking the column and its width."""
    if path.suffix.lower() == ".safetensors":
        return _safetensors_vectors(path, artifact)
    from embfilter_cli.vectors.arrow_batches import column_vectors, describe_columns, find_vector_column

    name = str(path)
    schema, table_batches = _table_reader(path)
    wanted = meta.get("embfilter.column") or None
    if wanted is not None and wanted not in schema.names:
        raise InputDataError(f"{name} has no vector column {wanted!r} (its columns: {describe_columns(schema)})")
    column = find_vector_column(schema, wanted, name)
    value_type = schema.field(column).type.value_type
    dtype = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}.get(value_type)
    if dtype is None:
        raise InputDataError(f"{name}: column {column!r} holds {value_type} values, not float16/32/64 vectors")
    k = artifact.output_dim

    def batches() -> Iterator[np.ndarray]:
        offset = 0
        for batch in table_batches:
            array = batch.column(batch.schema.get_field_index(column))
            x, _ = column_vectors(
                array,
                k,
                name=name,
                column=column,
                row_offset=offset,
                allow_null=True,
                dim_context=_width_words(artifact),
            )
            offset += batch.num_rows
            yield x

    return dtype, batches()


def _table_reader(path: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """(schema, record batches) of a Parquet or Arrow IPC file (the readers `apply` uses)."""
    name = str(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        from embfilter_cli.vectors.parquet import iter_parquet, open_parquet, parquet_schema

        file = open_parquet(path)
        return parquet_schema(file, name), iter_parquet(file, name, BATCH_ROWS)
    from embfilter_cli.vectors.arrow_ipc import IpcInput

    ipc = IpcInput(path, name)
    return ipc.schema, ipc.batches(BATCH_ROWS)


def _safetensors_vectors(path: Path, artifact: FilterArtifact) -> tuple[str, Iterator[np.ndarray]]:
    from embfilter_cli.vectors.safetensors_format import SafetensorsSource, read_safetensors_header

    name, k = str(path), artifact.output_dim
    with open(path, "rb") as fp:
        entries = read_safetensors_header(fp, name).entries
    floats = [e for e in entries if len(e.shape) == 2 and e.dtype in ("F16", "BF16", "F32", "F64")]
    chosen = floats if len(floats) == 1 else [e for e in floats if e.shape[-1] == k]
    if len(chosen) != 1:
        listing = ", ".join(f"{e.name} {e.dtype} {list(e.shape)}" for e in entries) or "no tensors"
        raise InputDataError(f"{name} holds no single 2-D float tensor of filtered vectors (it holds {listing})")
    target = chosen[0]
    if target.shape[-1] != k:
        raise InputDataError(
            f"{name}: tensor {target.name!r} has vectors of {target.shape[-1]} values but {_width_words(artifact)}"
        )

    def batches() -> Iterator[np.ndarray]:
        with open(path, "rb") as fp:
            source = SafetensorsSource(fp, name, path, tensor=target.name)
            try:
                for item in source.items(BATCH_ROWS):
                    yield np.asarray(item.vectors).reshape(-1, k)  # type: ignore[union-attr]
            finally:
                source.close()

    dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}[target.dtype]
    return dtype, batches()
