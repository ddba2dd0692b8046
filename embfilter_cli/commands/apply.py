"""`embfilter apply`: run stored vectors (.npy, JSONL, safetensors; file or stdin) through a filter."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import IO, Any

import click

from embfilter_cli.commands._options import MAX_VECTOR_BATCH, engine_options, force_option, output_options
from embfilter_cli.commands._tables import TABLE_FORMATS
from embfilter_cli.errors import UsageError

# Mirrors embfilter_cli.vectors.registry and .dtypes (kept here so `--help` never imports numpy; a test checks they agree).
FORMATS = ("npy", "jsonl", "safetensors")
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
_EXTENSIONS = {".npy": "npy", ".jsonl": "jsonl", ".ndjson": "jsonl", ".safetensors": "safetensors"}


@click.command()
@click.argument("filter_path", metavar="FILTER")
@click.argument("input_path", metavar="INPUT")
@click.option(
    "-o",
    "--output",
    default="-",
    show_default=True,
    metavar="PATH",
    help="Output file, or - for stdout; a folder for a folder or glob of Parquet/Arrow files.",
)
@click.option(
    "--format",
    "input_format",
    type=click.Choice(FORMATS + TABLE_FORMATS),
    default=None,
    help="Input format. [default: from the file extension, else sniffed from the first bytes; "
    "empty stdin counts as empty JSONL]",
)
@click.option(
    "--to",
    "output_format",
    type=click.Choice(FORMATS + TABLE_FORMATS),
    default=None,
    help="Output format. [default: from -o's extension, else the input's]",
)
@click.option("--field", default="embedding", show_default=True, help="JSONL: the field that holds the vector.")
@click.option(
    "--tensor",
    default=None,
    metavar="NAME",
    help="safetensors: the tensor to filter [default: the only 2-D float tensor]; when only the output is "
    "safetensors, the name to write [default: embeddings].",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default=None,
    help="Output dtype. [default: the input's; JSONL numbers are float64; bfloat16 only in safetensors]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_VECTOR_BATCH),
    default=None,
    help="Rows per batch; memory is about batch × (d + k) × 4 bytes. [default: 8192; 1024 for JSONL]",
)
@click.option(
    "--column",
    default=None,
    metavar="NAME",
    help="Parquet/Arrow: the vector column [default: embedding, embeddings or vector, else the only float-list column].",
)
@click.option(
    "--shard",
    "shard_text",
    default=None,
    metavar="I/N",
    help="Parquet/Arrow: process only shard I of N (0-based): whole files of a dataset, row groups of one file.",
)
@click.option("--resume", is_flag=True, help="Parquet/Arrow: skip outputs already complete; redo the others.")
@click.option("--allow-null", is_flag=True, help="Parquet/Arrow: keep null vectors null instead of failing.")
@engine_options
@click.option("--normalize", is_flag=True, help="L2-normalise each filtered vector.")
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Pass NaN/Inf vectors through (their results are NaN/Inf) instead of failing.",
)
@force_option
@output_options
def apply(
    filter_path: str,
    input_path: str,
    output: str,
    input_format: str | None,
    output_format: str | None,
    field: str,
    tensor: str | None,
    dtype: str | None,
    batch_size: int | None,
    normalize: bool,
    allow_nonfinite: bool,
    column: str | None,
    shard_text: str | None,
    resume: bool,
    allow_null: bool,
    engine: str,
    ray_address: str | None,
    concurrency: int | None,
    force: bool,
    json_: bool,
) -> None:
    """Filter stored embedding vectors: each d-dim vector x becomes the k-dim P·x (P·x − m for a centred filter).

    \b
    INPUT is a .npy file (memory-mapped, so files larger than RAM stream), a JSONL file (one object per
    line, vector in --field, other fields kept), a safetensors file (other tensors kept), or - for stdin.
    Arrays of any rank work: the filter acts on the last axis.

    \b
    Examples:
      embfilter apply artifacts/f.safetensors vectors.npy -o filtered.npy
      cat vectors.jsonl | embfilter apply F - --format jsonl > filtered.jsonl
      embfilter apply F vectors.jsonl --to npy --dtype float32 --normalize -o index.npy

    \b
    Parquet and Arrow (a file, a folder or a quoted glob; folders give folders with the same names):
      embfilter apply F vectors.parquet -o filtered.parquet
      embfilter apply F data/ -o out/ --column emb --shard 3/16 --resume
      producer | embfilter apply F - --format arrow -o - | consumer
      embfilter apply F 'data/*.parquet' -o out/ --engine ray --concurrency 8

    With -o FILE the output appears only when every row succeeded. On stdout, rows are written as they
    are processed: after an error (exit 1) stdout may already hold the earlier rows.
    """
    from embfilter_cli.commands._tables import is_table_job, run_table_apply

    if is_table_job(input_path, input_format, output_format, output):
        run_table_apply(
            filter_path=filter_path,
            input_path=input_path,
            output=output,
            input_format=input_format,
            output_format=output_format,
            column=column,
            dtype=dtype,
            batch_size=batch_size,
            normalize=normalize,
            allow_nonfinite=allow_nonfinite,
            allow_null=allow_null,
            shard_text=shard_text,
            resume=resume,
            force=force,
            json_=json_,
            engine=engine,
            ray_address=ray_address,
            concurrency=concurrency,
        )
        return
    table_only = {"--column": column, "--shard": shard_text, "--resume": resume, "--allow-null": allow_null}
    table_only["--engine"] = engine if engine != "local" else None
    used = [flag for flag, value in table_only.items() if value]
    if used:
        raise UsageError(f"{', '.join(used)} apply to Parquet/Arrow inputs only")
    if input_path != "-" and not Path(input_path).exists():
        raise UsageError(f"INPUT {input_path} does not exist; pass a vectors file or - for stdin")
    to_stdout = output == "-"
    if json_ and to_stdout:
        raise UsageError("--json prints a summary on stdout, which already carries the vectors; add -o FILE")
    out_ext_format = None if to_stdout else _EXTENSIONS.get(Path(output).suffix.lower())
    if output_format and out_ext_format and output_format != out_ext_format:
        raise UsageError(f"--to {output_format} contradicts the output name {output} ({out_ext_format})")
    if not to_stdout:
        from embfilter_cli.files import check_writable

        check_writable(output, force)  # before reading anything

    from embfilter_cli.filters.artifact import load_artifact

    artifact = load_artifact(filter_path)
    with contextlib.ExitStack() as stack:
        source = _open_input(stack, input_path, input_format, field, tensor, artifact)
        out_format = output_format or out_ext_format or source.format
        out_dtype = _output_dtype(dtype, source.dtype, out_format)
        if to_stdout and out_format != "jsonl" and sys.stdout.isatty():
            raise UsageError(
                f"refusing to write binary {out_format} data to a terminal; add -o FILE or redirect stdout"
            )
        stats = _run(
            stack,
            source,
            artifact,
            output,
            to_stdout,
            out_format,
            out_dtype,
            field,
            tensor,
            batch_size,
            normalize,
            allow_nonfinite,
            force,
        )
    _report(stats, artifact, input_path, output, source.format, out_format, normalize, json_)


def _open_input(
    stack: contextlib.ExitStack,
    input_path: str,
    input_format: str | None,
    field: str,
    tensor: str | None,
    artifact: Any,
) -> Any:
    """Open INPUT with the right reader; the format comes from --format, the extension, or the first bytes."""
    from embfilter_cli.vectors.detect import format_from_path, peek_head, sniff_format
    from embfilter_cli.vectors.registry import open_source

    context = _dim_context(artifact)
    if input_path == "-":
        stream, head = peek_head(_binary(sys.stdin))
        fmt = input_format or sniff_format(head) or ("jsonl" if not head.strip() else None)
        name, path = "stdin", None
        fp: IO[bytes] = stream
    else:
        path = Path(input_path)
        fp = stack.enter_context(open(path, "rb"))
        fmt = input_format or format_from_path(path)
        if fmt is None:
            fmt = sniff_format(fp.read(16))
            fp.seek(0)
        name, head = str(path), b""
    if fmt is None:
        raise UsageError(f"cannot tell the format of {name}; pass --format {'|'.join(FORMATS)}")
    source = open_source(
        fp, fmt, name, path=path, field=field, tensor=tensor, expected_dim=artifact.hidden_size, dim_context=context
    )
    stack.callback(source.close)
    return source


def _binary(stream: Any) -> IO[bytes]:
    """The byte stream under stdin, as CliRunner and real terminals both provide."""
    return getattr(stream, "buffer", stream)


def _dim_context(artifact: Any) -> str:
    """The end of a dimension-mismatch message: what the filter expects and what to do."""
    return (
        f"the filter expects {artifact.hidden_size} (fitted on {artifact.model_source or 'another model'}); "
        "use a filter fitted on the model that produced these vectors"
    )


def _output_dtype(requested: str | None, input_dtype: str, out_format: str) -> str:
    if requested == "bfloat16" and out_format != "safetensors":
        raise UsageError(f"{out_format} cannot store bfloat16; use --to safetensors or another --dtype")
    if requested:
        return requested
    if input_dtype == "bfloat16" and out_format != "safetensors":
        from embfilter_cli.console import info

        info(f"{out_format} cannot store bfloat16: writing float32 (pass --dtype to choose)")
        return "float32"
    return input_dtype


def _run(
    stack: contextlib.ExitStack,
    source: Any,
    artifact: Any,
    output: str,
    to_stdout: bool,
    out_format: str,
    out_dtype: str,
    field: str,
    tensor: str | None,
    batch_size: int | None,
    normalize: bool,
    allow_nonfinite: bool,
    force: bool,
) -> Any:
    from embfilter_cli.files import atomic_path
    from embfilter_cli.vectors.registry import get_format
    from embfilter_cli.vectors.stream import filter_stream

    rows = batch_size or get_format(source.format).batch_rows
    context = _dim_context(artifact)
    if to_stdout:
        from embfilter_cli.console import stdout_bytes

        out_fp = stdout_bytes()
        seekable = False
    else:
        tmp = stack.enter_context(atomic_path(output, force=force))
        out_fp = stack.enter_context(open(tmp, "wb"))  # closed before atomic_path renames it (LIFO)
        seekable = True
    sink = _make_sink(out_fp, seekable, out_format, source, artifact, field, tensor, normalize)
    with _progress(source, rows) as report:
        stats = filter_stream(
            source,
            sink,
            artifact.projection,
            mean=artifact.mean,
            batch_rows=rows,
            output_dtype=out_dtype,
            normalize=normalize,
            allow_nonfinite=allow_nonfinite,
            dim_context=context,
            progress=report,
        )
    out_fp.flush()
    return stats


def _make_sink(
    out_fp: IO[bytes],
    seekable: bool,
    out_format: str,
    source: Any,
    artifact: Any,
    field: str,
    tensor: str | None,
    normalize: bool,
) -> Any:
    from embfilter_cli.vectors.base import SinkOptions
    from embfilter_cli.vectors.registry import open_sink

    # Record which filter made these vectors: an index is only comparable with queries filtered the same way.
    # (Formats that store string metadata keep it, after the input's own.)
    provenance = {
        "embfilter.projection_sha256": artifact.metadata.get("projection_sha256", ""),
        "embfilter.model_source": artifact.model_source,
        "embfilter.unembedding_sha256": artifact.unembedding_sha256,
        "embfilter.normalized": "true" if normalize else "false",
    }
    if artifact.centered:  # P alone does not name the map: two means give two incomparable indexes
        provenance["embfilter.mean_sha256"] = artifact.metadata["mean_sha256"]
    options = SinkOptions(seekable=seekable, source=source, field=field, tensor=tensor, metadata=provenance)
    return open_sink(out_fp, out_format, options)


def _progress(source: Any, batch_rows: int) -> Any:
    """The progress bar for inputs larger than one batch (JSONL: 16 MiB); none when small."""
    from embfilter_cli.console import progress_bar

    total = source.progress_total
    small = total is not None and (total <= batch_rows if source.format != "jsonl" else total < 16 << 20)
    return progress_bar("Filtering", total, show=not small)


def _report(
    stats: Any,
    artifact: Any,
    input_path: str,
    output: str,
    in_format: str,
    out_format: str,
    normalize: bool,
    json_: bool,
) -> None:
    from embfilter_cli.console import emit_json, info, warn

    if stats.nonfinite_rows:
        warn(f"{stats.nonfinite_rows} input vectors held NaN/Inf; their results are NaN/Inf")
    summary = {
        "input": "stdin" if input_path == "-" else input_path,
        "output": "stdout" if output == "-" else output,
        "filter": str(artifact.path),
        "projection_sha256": artifact.metadata.get("projection_sha256"),
        "mean_sha256": artifact.metadata.get("mean_sha256") if artifact.centered else None,
        "input_format": in_format,
        "output_format": out_format,
        "rows": stats.rows,
        "input_dim": stats.input_dim,
        "output_dim": stats.output_dim,
        "input_dtype": stats.input_dtype,
        "output_dtype": stats.output_dtype,
        "normalized": normalize,
        "nonfinite_rows": stats.nonfinite_rows,
        "seconds": round(stats.seconds, 4),
        "rows_per_second": round(stats.rows_per_second, 1) if stats.rows else 0.0,
    }
    if json_:
        emit_json(summary)
        return
    info(
        f"Filtered {stats.rows:,} vectors {stats.input_dim} → {stats.output_dim} dims ({stats.output_dtype}"
        f"{', L2-normalised' if normalize else ''}) in {stats.seconds:.2f} s"
        + (f" ({stats.rows_per_second:,.0f} rows/s)" if stats.rows else "")
        + f" → {summary['output']}"
    )
