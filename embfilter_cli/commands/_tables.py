"""`embfilter apply` for Parquet and Arrow tables: parse the table options, plan, run, report.

The work lives in `embfilter_cli.vectors.tables` (local) and `embfilter_cli.engines` (Ray); this
module only turns options into a plan and the result into lines on stderr (or `--json`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from embfilter_cli.errors import UsageError

# Mirrors embfilter_cli.vectors.shards (kept here so `--help` never imports pyarrow; a test checks they agree).
TABLE_FORMATS = ("parquet", "arrow")
TABLE_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
_GLOB_CHARS = set("*?[")


def is_table_job(input_path: str, input_format: str | None, output_format: str | None, output: str) -> bool:
    """Whether this `apply` reads or writes Parquet/Arrow (a folder or a glob always does)."""
    if input_format in TABLE_FORMATS or output_format in TABLE_FORMATS:
        return True
    path = Path(input_path)
    if input_path != "-" and (
        path.is_dir()
        or path.suffix.lower() in TABLE_EXTENSIONS
        # an existing file whose name holds [ ] * ? (e.g. "run[3].npy") is that file, not a pattern
        or (_GLOB_CHARS & set(input_path) and not path.is_file())
    ):
        return True
    return output != "-" and Path(output).suffix.lower() in TABLE_EXTENSIONS


def parse_shard(text: str | None) -> Any:
    """Parse `--shard I/N` into a Shard, or None when the option is not given."""
    if text is None:
        return None
    from embfilter_cli.vectors.shards import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise UsageError(f"--shard {exc}") from None


def run_table_apply(
    *,
    filter_path: str,
    input_path: str,
    output: str,
    input_format: str | None,
    output_format: str | None,
    column: str | None,
    dtype: str | None,
    batch_size: int | None,
    normalize: bool,
    allow_nonfinite: bool,
    allow_null: bool,
    shard_text: str | None,
    resume: bool,
    force: bool,
    json_: bool,
    engine: str = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
) -> None:
    """The whole table path of `apply` (see `embfilter apply --help`)."""
    shard = parse_shard(shard_text)
    if dtype == "bfloat16":
        raise UsageError("Parquet and Arrow outputs hold float16, float32 or float64; pick one with --dtype")
    for fmt in (input_format, output_format):
        if fmt is not None and fmt not in TABLE_FORMATS:
            raise UsageError(
                f"--format/--to {fmt} cannot be mixed with Parquet/Arrow: tables give tables "
                "(use --to parquet or --to arrow)"
            )
    to_stdout = output == "-"
    if json_ and to_stdout:
        raise UsageError("--json prints a summary on stdout, which already carries the vectors; add -o FILE")
    if to_stdout or input_path == "-":
        if input_path != "-" or not to_stdout:
            what = "stdin" if input_path == "-" else "stdout"
            raise UsageError(
                f"Parquet/Arrow through {what} works only as an Arrow IPC stream both ways "
                "(`embfilter apply F - --format arrow -o -`); name files otherwise"
            )
        if (input_format or "arrow") != "arrow" or (output_format or "arrow") != "arrow":
            raise UsageError("pipes carry Arrow IPC streams: Parquet needs random access, so name a file")
        if shard or resume or engine != "local":
            raise UsageError("--shard, --resume and --engine need files, not a pipe")
        if sys.stdout.isatty():
            raise UsageError("refusing to write binary Arrow data to a terminal; add -o FILE or redirect stdout")

    from embfilter_cli.vectors.arrow_batches import FilterBatch
    from embfilter_cli.vectors.tables import DEFAULT_TABLE_BATCH_ROWS

    fb = FilterBatch(
        filter_path,
        column,
        dtype=dtype or "float32",
        normalize=normalize,
        allow_null=allow_null,
        allow_nonfinite=allow_nonfinite,
    )
    fb.artifact  # noqa: B018 - load (and validate) the filter before touching the input
    rows = batch_size or DEFAULT_TABLE_BATCH_ROWS
    if input_path == "-":
        from embfilter_cli.console import stdout_bytes
        from embfilter_cli.vectors.tables import apply_ipc_stream

        stats = apply_ipc_stream(_binary(sys.stdin), stdout_bytes(), fb, batch_rows=rows)
        _report(stats, fb, input_path, output, "arrow", "arrow", json_)
        return

    from embfilter_cli.console import warn
    from embfilter_cli.vectors.plan import plan_job
    from embfilter_cli.vectors.tables import count_parts

    plan = plan_job(
        input_path, output, in_format=input_format, out_format=output_format, shard=shard, count_parts=count_parts
    )
    units = plan.units
    if plan.skipped:
        warn(f"skipped {len(plan.skipped)} input path(s): {'; '.join(plan.skipped)}")
    if engine == "ray":
        # The engine module lands separately; drop this ignore then (warn_unused_ignores says when).
        from embfilter_cli.engines.ray_engine import run_units_ray

        stats = run_units_ray(
            units, fb, batch_rows=rows, force=force, resume=resume, address=ray_address, concurrency=concurrency
        )
        stats.input_dim, stats.output_dim = fb.dims()
        stats.output_dtype = fb.dtype
    else:
        from embfilter_cli.console import progress_bar
        from embfilter_cli.vectors.tables import apply_tables

        with progress_bar("Filtering") as report:
            stats = apply_tables(units, fb, batch_rows=rows, force=force, resume=resume, progress=report)
    in_fmt = units[0].in_format if units else (input_format or "parquet")
    out_fmt = units[0].out_format if units else (output_format or in_fmt)
    _report(stats, fb, input_path, output, in_fmt, out_fmt, json_, shard=shard)


def _binary(stream: Any) -> Any:
    """The byte stream under stdin."""
    return getattr(stream, "buffer", stream)


def _report(
    stats: Any, fb: Any, input_path: str, output: str, in_fmt: str, out_fmt: str, json_: bool, shard: Any = None
) -> None:
    from embfilter_cli.console import emit_json, info, warn

    if stats.nonfinite_rows:
        warn(f"{stats.nonfinite_rows} input vectors held NaN/Inf; their results are NaN/Inf")
    if stats.null_rows:
        warn(f"{stats.null_rows} input vectors were null or held nulls; they are null in the output (--allow-null)")
    summary = {
        "input": "stdin" if input_path == "-" else input_path,
        "output": "stdout" if output == "-" else output,
        "filter": str(fb.artifact.path),
        "projection_sha256": fb.artifact.metadata.get("projection_sha256"),
        "input_format": in_fmt,
        "output_format": out_fmt,
        "shard": str(shard) if shard is not None else None,
        "files": stats.files,
        "skipped": stats.skipped,
        "redone": stats.redone,
        "outputs": stats.outputs,
        "rows": stats.rows,
        "input_dim": stats.input_dim,
        "output_dim": stats.output_dim,
        "output_dtype": stats.output_dtype,
        "normalized": fb.normalize,
        "nonfinite_rows": stats.nonfinite_rows,
        "null_rows": stats.null_rows,
        "seconds": round(stats.seconds, 4),
        "rows_per_second": round(stats.rows_per_second, 1) if stats.rows else 0.0,
    }
    if json_:
        emit_json(summary)
        return
    skipped = f", {len(stats.skipped)} skipped as already complete" if stats.skipped else ""
    if stats.redone:
        skipped += f", {len(stats.redone)} redone (made with other options or inputs)"
    info(
        f"Filtered {stats.rows:,} vectors {stats.input_dim} → {stats.output_dim} dims ({stats.output_dtype}"
        f"{', L2-normalised' if fb.normalize else ''}) in {stats.seconds:.2f} s"
        + (f" ({stats.rows_per_second:,.0f} rows/s)" if stats.rows else "")
        + f" → {summary['output']} ({stats.files} file{'s' if stats.files != 1 else ''} written{skipped})"
    )
