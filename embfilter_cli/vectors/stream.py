"""The streaming filter loop: every vector of a Source through the filter into a Sink.

Batches are projected with one GEMM each (minus the mean m of a centred filter: y = P·x − m),
checked for NaN/Inf (the error names the row or line) and optionally L2-normalised; memory stays
about batch × (d + k) × 4 bytes whatever the file size.
Precision: float16/float32 inputs are computed in float32, float64 (and every JSONL input, whose
numbers are doubles) in float64.

The formats are in `npy_format`, `jsonl_format`, `safetensors_format` (protocols in `base`, the
list in `registry`, detection in `detect`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embfilter_cli.errors import InputDataError
from embfilter_cli.filters.finite import unit_rows
from embfilter_cli.vectors.base import DEFAULT_BATCH_ROWS, Passthrough, ProgressFn, Sink, Source


@dataclass
class FilterStats:
    """What `filter_stream` did."""

    rows: int
    input_dim: int
    output_dim: int
    input_dtype: str
    output_dtype: str
    seconds: float
    nonfinite_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        """Throughput; infinite when no time was measured."""
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def filter_stream(
    source: Source,
    sink: Sink,
    projection: np.ndarray,
    *,
    mean: np.ndarray | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    output_dtype: str | None = None,
    normalize: bool = False,
    allow_nonfinite: bool = False,
    dim_context: str = "",
    progress: ProgressFn | None = None,
) -> FilterStats:
    """Project every vector of `source` with `projection` (k, d) and write the results to `sink`.

    Args:
        source: where the vectors come from.
        sink: where the (…, k) results go; it receives `begin`, one `write` per batch, `finish`.
        projection: the filter matrix P; each row x becomes P·x.
        mean: a centred filter's (k,) mean m; each row x becomes P·x − m (before normalisation).
        batch_rows: rows per batch; memory is about batch_rows × (d + k) × 4 bytes.
        output_dtype: dtype name of the written values; default the source's dtype.
        normalize: L2-normalise each result (all-zero results stay zero).
        allow_nonfinite: let NaN/Inf inputs through (their results are NaN/Inf) instead of failing.
        dim_context: words for a dimension mismatch, e.g. "the filter expects 576 (fitted on X)".
        progress: called after each batch with (units done, units total or None).

    Raises:
        InputDataError: wrong dimension, NaN/Inf, malformed or truncated input; names the row or line.
    """
    k, d = projection.shape
    out_dtype = output_dtype or source.dtype
    if source.dim is not None and source.dim != d and not (source.rows == 0 and source.dim == 0):
        raise InputDataError(
            f"{source.name} holds {source.dim}-dimensional vectors but {dim_context or f'{d} are expected'}"
        )
    compute = np.dtype(np.float64 if "float64" in (source.dtype, out_dtype) else np.float32)
    # (d, k): one GEMM per batch, no per-row Python. A transposed view costs BLAS nothing and saves a copy.
    pt = projection.T if projection.dtype == compute else projection.T.astype(compute)
    m = None if mean is None else mean.astype(compute, copy=False)
    out_buf = np.empty((batch_rows, k), dtype=compute)
    started = time.perf_counter()
    sink.begin(None if source.lead_shape is None else source.lead_shape, k, out_dtype)
    rows = 0
    nonfinite_rows = 0
    for item in source.items(batch_rows, passthrough=sink.wants_passthrough):
        if isinstance(item, Passthrough):
            sink.passthrough(item)
            continue
        x = item.vectors if item.vectors.dtype == compute else item.vectors.astype(compute)
        finite_rows = _finite_rows(x)
        if not finite_rows.all():
            bad = int(np.flatnonzero(~finite_rows)[0])
            if not allow_nonfinite:
                col = int(np.flatnonzero(~np.isfinite(x[bad]))[0])
                raise InputDataError(
                    f"{source.name} {source.where(item, bad)} has {x[bad, col]} at position {col}; clean the input "
                    "or pass --allow-nonfinite to let such rows through (their results are NaN/Inf)"
                )
            nonfinite_rows += int((~finite_rows).sum())
        with np.errstate(over="ignore", invalid="ignore"):
            y = np.matmul(x, pt, out=out_buf[: len(x)])
            if compute != np.float64 and not _finite_rows(y)[finite_rows].all():
                # Finite inputs near float32's range overflow the product: redo this batch in float64.
                y = np.matmul(x.astype(np.float64), projection.T.astype(np.float64))
            if m is not None:
                y -= m
            if normalize:
                y = unit_rows(y)  # scaled first: Σ y² of values near 3e38 would overflow
            if out_dtype in ("float16", "float32") and y.dtype != np.dtype(out_dtype):
                y = y.astype(out_dtype)
            elif y.dtype != compute and out_dtype != "float64":  # bfloat16 sinks take the compute dtype
                y = y.astype(compute)
        # Every written vector is finite unless --allow-nonfinite let non-finite ones through.
        if not allow_nonfinite:
            written = _finite_rows(y)
            if not written.all():
                bad = int(np.flatnonzero(~written)[0])
                if out_dtype == "float16":
                    hint = "float16's range (±65504); pass --dtype float32 or --normalize"
                else:
                    hint = f"{y.dtype}'s range; pass --normalize or --dtype float64, or scale the input"
                raise InputDataError(f"{source.name} {source.where(item, bad)}: a filtered value exceeds {hint}")
        sink.write(y, item)
        rows += len(x)
        if progress is not None:
            progress(item.done, source.progress_total)
    sink.finish()
    return FilterStats(rows, d, k, source.dtype, out_dtype, time.perf_counter() - started, nonfinite_rows)


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Which rows hold only finite values, at the cost of one row sum (no (m, d) temporary).

    NaN or ±Inf anywhere in a row makes its sum non-finite, so a finite sum proves the row finite;
    only rows whose sum is not finite (NaN/Inf, or finite values overflowing) are checked exactly.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.isfinite(x.sum(axis=1))
    if not ok.all():
        suspect = np.flatnonzero(~ok)
        ok[suspect] = np.isfinite(x[suspect]).all(axis=1)
    return ok
