"""`embfilter embed` with Parquet: a text column in, an `embedding` column out (local or on Ray).

The work lives in `embfilter_cli.engines.embed_tables` (`EmbedBatch`) and `vectors.tables` /
`engines.ray_engine`; this module plans the files and reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embfilter_cli.errors import UsageError

TABLE_SUFFIXES = (".parquet", ".pq")
_GLOB_CHARS = set("*?[")
DEFAULT_TEXTS_PER_BATCH = 256  # rows per record batch: progress and memory granularity, not the model batch


def is_table_embed(input_path: str, output: str) -> bool:
    """Parquet in (a file, folder or glob) or Parquet out."""
    if input_path != "-" and (
        Path(input_path).is_dir() or Path(input_path).suffix.lower() in TABLE_SUFFIXES or _GLOB_CHARS & set(input_path)
    ):
        return True
    return Path(output).suffix.lower() in TABLE_SUFFIXES or output.endswith("/")


def run_table_embed(
    *,
    input_path: str,
    output: str,
    input_format: str,
    text_column: str,
    force: bool,
    resume: bool,
    engine: str,
    ray_address: str | None,
    concurrency: int | None,
    batch_rows: int | None,
    embed_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Embed into Parquet; returns the summary (rows, files, skipped, seconds, dims)."""
    from embfilter_cli.engines.embed_tables import EmbedBatch
    from embfilter_cli.text.recipes import resolve_recipe

    resolve_recipe(embed_kwargs["recipe"])  # a bad template fails before anything is loaded
    if output == "-":
        raise UsageError("Parquet cannot be written to stdout; give -o FILE.parquet (or a folder)")
    fn = EmbedBatch(text_column=text_column, **embed_kwargs)
    rows_per_batch = batch_rows or DEFAULT_TEXTS_PER_BATCH
    table_in = input_path != "-" and (
        Path(input_path).is_dir() or Path(input_path).suffix.lower() in TABLE_SUFFIXES or _GLOB_CHARS & set(input_path)
    )
    if not table_in:
        if engine != "local" or resume:
            raise UsageError("--engine ray and --resume need Parquet input files")
        return _texts_to_parquet(input_path, input_format, output, force, fn)
    from embfilter_cli.console import warn
    from embfilter_cli.vectors.plan import plan_job
    from embfilter_cli.vectors.shards import check_folders_writable
    from embfilter_cli.vectors.tables import apply_tables

    plan = plan_job(input_path, output, out_format="parquet")
    units = plan.units
    if not units[0].in_folder and units[0].output.suffix.lower() not in TABLE_SUFFIXES:
        raise UsageError(f"{output}: a Parquet input gives a Parquet output; name a .parquet file or a folder")
    if plan.skipped:
        warn(f"skipped {len(plan.skipped)} input path(s): {'; '.join(plan.skipped)}")
    check_folders_writable(units)  # a read-only destination fails before the model is even resolved
    fn.location  # noqa: B018 - resolve the model (and check the filter) before any file is opened
    fn.artifact  # noqa: B018
    if engine == "ray":
        from embfilter_cli.engines.ray_engine import run_units_ray

        gpu = 1 if str(embed_kwargs.get("device", "")).startswith("cuda") else 0
        stats = run_units_ray(
            units,
            fn,
            batch_rows=rows_per_batch,
            force=force,
            resume=resume,
            address=ray_address,
            concurrency=concurrency,
            num_gpus=gpu,
        )
    else:
        stats = apply_tables(units, fn, batch_rows=rows_per_batch, force=force, resume=resume)
    return {
        "rows": stats.rows,
        "files": stats.files,
        "skipped": stats.skipped,
        "redone": stats.redone,
        "outputs": stats.outputs,
        "empty_texts": stats.null_rows,
        "seconds": stats.seconds,
        "dim": fn.output_dim() if stats.files else None,
    }


def embed_tables_command(options: dict[str, Any]) -> None:
    """The Parquet path (see `commands/_embed_tables.py`): run it and report."""
    from embfilter_cli.console import emit_json, info, warn

    summary = run_table_embed(
        input_path=options["input_path"],
        output=options["output"],
        input_format=options["input_format"],
        text_column=options["text_column"],
        force=options["force"],
        resume=options["resume"],
        engine=options["engine"],
        ray_address=options["ray_address"],
        concurrency=options["concurrency"],
        batch_rows=None,
        embed_kwargs={
            "model": options["model"],
            "filter": options["filter_path"],
            "normalize": options["normalize"],
            "pooling": options["pooling"],
            "recipe": options["recipe"],
            "batch_size": options["batch_size"],
            "max_length": options["max_length"],
            "device": options["device"],
            "dtype": options["dtype"],
            "revision": options["revision"],
            "use_cache": not options["no_cache"],
            "output_column": options["output_column"],
        },
    )
    if summary["empty_texts"]:
        warn(f"{summary['empty_texts']} empty or null text(s) kept as rows with a null embedding")
    skipped = f", {len(summary['skipped'])} skipped as already complete" if summary["skipped"] else ""
    if summary.get("redone"):
        skipped += f", {len(summary['redone'])} redone (made with other options or inputs)"
    info(
        f"Embedded {summary['rows']:,} rows in {summary['seconds']:.1f}s → {options['output']} "
        f"({summary['files']} file{'s' if summary['files'] != 1 else ''} written{skipped})"
    )
    if options["json_"]:
        emit_json({"output": options["output"], "engine": options["engine"], **summary})


def _texts_to_parquet(input_path: str, input_format: str, output: str, force: bool, fn: Any) -> dict[str, Any]:
    """Lines or JSONL in, one Parquet file out: the records' fields as columns plus `embedding`."""
    import time

    import pyarrow.parquet as pq

    from embfilter_cli.console import warn
    from embfilter_cli.engines.embed_tables import records_table
    from embfilter_cli.files import atomic_path, check_writable
    from embfilter_cli.text.texts import describe_skipped, read_texts

    check_writable(output, force)
    texts_in = read_texts(input_path, input_format)
    if texts_in.skipped:
        warn(describe_skipped(texts_in.skipped))
    started = time.perf_counter()
    records = texts_in.records if texts_in.records is not None else [{"text": t} for t in texts_in.texts]
    # One Error: line for what Parquet cannot hold; a field named like the output column is refused (EmbedBatch).
    table = records_table(records, str(input_path))
    if fn.text_column not in table.column_names:  # JSONL records hold their text in `text`
        fn.text_column = "text"
    out = fn(table, name=str(input_path))
    with atomic_path(output, force=force) as tmp:
        pq.write_table(out.replace_schema_metadata(fn.output_schema(table.schema).metadata), tmp)
    return {
        "rows": out.num_rows,
        "files": 1,
        "skipped": [],
        "outputs": [output],
        "empty_texts": 0,
        "skipped_lines": texts_in.skipped,
        "seconds": time.perf_counter() - started,
        "dim": fn.output_dim(),
    }
