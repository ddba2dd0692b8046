"""`embfilter apply`: run stored vectors (.npy, JSONL, safetensors; file or stdin) through a filter."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

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

    from embfilter_cli.commands import _apply_stream
    from embfilter_cli.console import emit_json, info, warn
    from embfilter_cli.filters.artifact import load_artifact
    from embfilter_cli.vectors import apply_job

    artifact = load_artifact(filter_path)
    with contextlib.ExitStack() as stack:
        source = _apply_stream.open_input(stack, input_path, input_format, field, tensor, artifact, FORMATS)
        out_format = output_format or out_ext_format or source.format
        out_dtype = apply_job.output_dtype(dtype, source.dtype, out_format, note=info)
        if to_stdout and out_format != "jsonl" and sys.stdout.isatty():
            raise UsageError(
                f"refusing to write binary {out_format} data to a terminal; add -o FILE or redirect stdout"
            )
        stats = _apply_stream.run(
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
    if stats.nonfinite_rows:
        warn(f"{stats.nonfinite_rows} input vectors held NaN/Inf; their results are NaN/Inf")
    summary = apply_job.summary(stats, artifact, input_path, output, source.format, out_format, normalize)
    if json_:
        emit_json(summary)
        return
    info(apply_job.summary_line(stats, normalize, summary["output"]))
