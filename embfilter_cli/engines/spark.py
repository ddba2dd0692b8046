"""Apply a filter to the vector column of a Spark DataFrame, through Arrow (`mapInArrow`).

    from embfilter_cli.engines.spark import filter_dataframe
    filtered = filter_dataframe(df, "artifacts/f.safetensors", column="embedding")

Each Python worker loads the filter once (a per-process cache of artifacts keyed by the file), then
filters whole Arrow record batches with a `FilterBatch` built for this call's settings (column,
dtype, normalize, allow_null), the same code as `embfilter apply`; nothing is broadcast or computed
per row. Only the loaded file is shared between calls: Spark reuses its Python workers, so a cache
of whole `FilterBatch`es keyed by the file would serve one call's settings to the next. The filter file must be readable at the same path on every worker (a shared
file system, or ship it with `SparkContext.addFile` and pass `SparkFiles.get(name)`). The output
column keeps its name and becomes `array<float>` (Spark has no fixed-size list type; every array
has k elements). Other columns pass through unchanged.

Not handled: Spark Connect sessions older than 3.5 (no `mapInArrow`), vector columns of Spark ML
`VectorUDT` type (convert with `pyspark.ml.functions.vector_to_array` first).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from embfilter_cli.errors import InputDataError, MissingDependencyError
from embfilter_cli.vectors.arrow_batches import VECTOR_COLUMN_NAMES, FilterBatch

SPARK_PIP = "pip install 'embfilter[spark]'"
# Per Python worker process: (path, mtime, size) -> loaded FilterArtifact. Settings are not part of
# the value, so every call builds its own FilterBatch around the shared artifact.
_WORKER_ARTIFACTS: dict[tuple[str, float, int], Any] = {}


def require_pyspark() -> Any:
    """The `pyspark` module, or a MissingDependencyError naming the pip command."""
    try:
        import pyspark
    except ImportError:
        raise MissingDependencyError(f"the Spark integration needs pyspark; run: {SPARK_PIP}") from None
    return pyspark


def _worker_filter(path: str, column: str, dtype: str, normalize: bool, allow_null: bool) -> FilterBatch:
    """A `FilterBatch` with exactly these settings around the artifact this worker already loaded."""
    stat = os.stat(path)
    key = (path, stat.st_mtime, stat.st_size)
    artifact = _WORKER_ARTIFACTS.get(key)
    if artifact is None:
        from embfilter_cli.filters.artifact import load_artifact

        artifact = _WORKER_ARTIFACTS[key] = load_artifact(path)  # once per worker process and file
    return FilterBatch(artifact, column, dtype=dtype, normalize=normalize, allow_null=allow_null)


def filter_dataframe(
    df: Any,
    filter: str | os.PathLike[str],  # noqa: A002 - the public name users expect
    column: str | None = None,
    *,
    dtype: str = "float32",
    normalize: bool = False,
    allow_null: bool = False,
) -> Any:
    """`df` with its vector column filtered (same name, `array<float>` of the filter's k values).

    Args:
        df: a pyspark DataFrame with a column of float arrays.
        filter: path of the filter artifact, readable on every worker.
        column: the vector column; default `embedding`, `embeddings` or `vector`, else the only float-array column.
        dtype: "float32" (Spark `float`) or "float64" (`double`).
        normalize: L2-normalise each filtered vector.
        allow_null: keep null vectors null instead of failing the task.

    Raises:
        MissingDependencyError: pyspark is not installed.
        InputDataError: no such column, or not an array of floats (listing the columns and types).
    """
    require_pyspark()
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, not {dtype!r}")
    path = os.fspath(filter)
    fb = FilterBatch(path, column, dtype=dtype, normalize=normalize, allow_null=allow_null)
    k = fb.artifact.output_dim  # validates the filter on the driver before any task starts
    fields = list(df.schema.fields)
    floats = [
        f.name
        for f in fields
        if isinstance(f.dataType, ArrayType) and isinstance(f.dataType.elementType, (FloatType, DoubleType))
    ]
    name = (
        column
        or next((n for n in VECTOR_COLUMN_NAMES if n in df.columns), None)
        or (floats[0] if len(floats) == 1 else None)
    )
    listing = ", ".join(f"{f.name} {f.dataType.simpleString()}" for f in fields)
    if name is None or name not in df.columns or name not in floats:
        raise InputDataError(
            f"the DataFrame has no usable vector column{f' {name!r}' if name else ''} (its columns: {listing}); "
            "pass column= naming an array<float> or array<double> column"
        )
    element = FloatType() if dtype == "float32" else DoubleType()
    out_schema = StructType(
        [StructField(f.name, ArrayType(element, True), True) if f.name == name else f for f in fields]
    )
    options = (path, name, dtype, normalize, allow_null)

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        local = _worker_filter(*options)
        value_type = pa.float32() if dtype == "float32" else pa.float64()
        for batch in batches:
            out = local(batch, name="DataFrame partition")
            i = out.schema.get_field_index(name)
            as_list = out.column(i).cast(pa.list_(value_type))  # Spark's ArrayType is a variable-size list
            yield out.set_column(i, pa.field(name, as_list.type), as_list)

    del k
    return df.mapInArrow(run, out_schema)
