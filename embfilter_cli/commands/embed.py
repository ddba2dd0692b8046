"""`embfilter embed`: texts in, embeddings out (npy or JSONL), optionally filtered and normalised."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from embfilter_cli.commands._options import (
    batch_size_option,
    device_option,
    dtype_option,
    engine_options,
    force_option,
    input_format_option,
    max_length_option,
    model_cache_option,
    output_column_option,
    output_options,
    pooling_option,
    recipe_option,
)
from embfilter_cli.errors import InputDataError, UsageError

OUTPUT_SUFFIXES = (".npy", ".jsonl")
EMBEDDING_FIELD = "embedding"  # JSONL output: the vectors' field unless --output-column names another


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option(
    "-o",
    "--output",
    required=True,
    metavar="PATH",
    help="Where to write: .npy (float32 rows), .jsonl (records with an `embedding` field), .parquet (the "
    "input's columns plus `embedding`; a folder for a folder of Parquet files); `-` writes JSONL to stdout.",
)
@click.option(
    "-m",
    "--model",
    "model",
    default=None,
    metavar="SPEC",
    help="Alias, Hub id, model folder or .gguf file. Default: the built-in SmolLM2-135M-Instruct GGUF.",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")
@pooling_option
@recipe_option
@click.option(
    "--filter",
    "filter_path",
    default=None,
    metavar="FILTER",
    help="Apply this filter artifact: P·x, minus its mean when it is centred, then --normalize. Refused if "
    "fitted on another model, or centred on vectors of another --pooling/--recipe.",
)
@click.option("--normalize", is_flag=True, help="L2-normalise every output vector.")
@batch_size_option
@max_length_option
@device_option
@dtype_option
@input_format_option
@model_cache_option
@click.option("--text-column", default="text", show_default=True, metavar="NAME", help="Parquet: the text column.")
@click.option("--resume", is_flag=True, help="Parquet folders: skip outputs already complete; redo the others.")
@output_column_option
@engine_options
@force_option
@output_options
def embed(
    input_path: str,
    output: str,
    model: str | None,
    revision: str | None,
    pooling: str,
    recipe: str,
    filter_path: str | None,
    normalize: bool,
    batch_size: int,
    max_length: int,
    device: str,
    dtype: str,
    input_format: str,
    no_cache: bool,
    text_column: str,
    resume: bool,
    output_column: str | None,
    engine: str,
    ray_address: str | None,
    concurrency: int | None,
    force: bool,
    json_: bool,
) -> None:
    """Embed texts (one per line, or JSONL with a `text` field; a path or - for stdin).

    Empty texts are skipped with a warning that names their line numbers, so the output has one
    row per non-empty text, in input order. JSONL output keeps every other field of each record.
    With --json, a summary of the run (rows, dims, texts/s, skipped lines) is printed on stdout.

    \b
    Examples:
      embfilter embed texts.txt -o raw.npy
      embfilter embed --model qwen2.5-0.5b --recipe prompteol --pooling last --filter F texts.jsonl -o out.jsonl
      cat texts.txt | embfilter embed - -o - --normalize
      embfilter embed corpus.parquet --text-column body -o emb.parquet --filter F
      embfilter embed corpus/ --text-column body -o emb/ --engine ray --concurrency 2

    Parquet input keeps every row: an empty or null text gets a null embedding (the row still lines
    up with its id); other columns are kept and `embedding` is a fixed-size list of float32.
    """
    from embfilter_cli.commands._embed_tables import embed_tables_command, is_table_embed

    if is_table_embed(input_path, output):
        embed_tables_command(locals())
        return
    if resume or engine != "local":
        raise UsageError("--resume and --engine apply to Parquet and Arrow only")
    to_stdout = output == "-"
    suffix = Path(output).suffix.lower()
    if not to_stdout and suffix not in OUTPUT_SUFFIXES:
        raise click.BadParameter(
            f"{output!r} must end in .npy or .jsonl (or be - for JSONL on stdout)", param_hint="-o/--output"
        )
    if output_column is not None and suffix == ".npy":
        raise UsageError(
            "--output-column names the vectors' field of a JSONL output (or a table's column); .npy has none"
        )
    if to_stdout and json_:
        raise UsageError("--json prints a summary on stdout, which -o - already uses for the embeddings; drop one")

    from embfilter_cli.api.encoder import Encoder
    from embfilter_cli.commands._hooks import console_hooks
    from embfilter_cli.console import info, warn
    from embfilter_cli.text.recipes import resolve_recipe
    from embfilter_cli.text.texts import describe_skipped, read_texts

    resolve_recipe(recipe)  # a bad template fails before anything is read or loaded
    if not to_stdout:
        from embfilter_cli.files import check_writable

        check_writable(output, force)
    texts_in = read_texts(input_path, input_format)
    if texts_in.skipped:
        warn(describe_skipped(texts_in.skipped))
    column = output_column or EMBEDDING_FIELD
    if suffix != ".npy" and output_column is None and texts_in.records is not None:
        _refuse_replacing(texts_in.records, column, input_path)

    encoder = Encoder(
        model,
        revision=revision,
        pooling=pooling,
        recipe=recipe,
        filter=filter_path,
        normalize=normalize,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
        use_cache=not no_cache,
        hooks=console_hooks(),
    )
    start = time.perf_counter()
    vectors = encoder.encode(texts_in.texts)
    seconds = time.perf_counter() - start
    _write(vectors, texts_in, output, force, column)
    rate = len(vectors) / seconds if seconds > 0 else float("inf")
    info(
        f"Embedded {len(vectors)} texts → {vectors.shape[1]} dims in {seconds:.1f}s ({rate:.1f} texts/s)"
        + ("" if to_stdout else f"; wrote {output}")
    )
    if json_:
        from embfilter_cli.console import emit_json

        emit_json(
            {
                "output": output,
                "rows": int(vectors.shape[0]),
                "dim": int(vectors.shape[1]),
                "model_source": encoder.location.source,
                "pooling": pooling,
                "recipe": recipe,
                "filter": str(encoder.artifact.path) if encoder.artifact is not None else None,
                "normalized": normalize,
                "truncated": encoder.last_truncated,
                "skipped_lines": texts_in.skipped,
                "seconds": round(seconds, 3),
                "texts_per_second": round(rate, 3),
            }
        )


def _refuse_replacing(records: list[dict[str, Any]], column: str, input_path: str) -> None:
    """Refuse a JSONL input whose records already hold the vectors' field, unless it was named on purpose."""
    held = sum(column in record for record in records)
    if held:
        name = "stdin" if input_path == "-" else input_path
        raise InputDataError(
            f"{name}: {held} of its records already have a field {column!r} that the vectors would replace; pass "
            f"--output-column NAME for another name, or --output-column {column} to replace it"
        )


def _write(vectors: Any, texts_in: Any, output: str, force: bool, column: str) -> None:
    import numpy as np

    if output == "-":
        from embfilter_cli.console import out_lines

        out_lines(_jsonl_lines(vectors, texts_in, column))
        return
    from embfilter_cli.files import atomic_path

    with atomic_path(output, force=force) as tmp:
        if output.lower().endswith(".npy"):
            with tmp.open("wb") as handle:
                np.save(handle, np.ascontiguousarray(vectors, dtype=np.float32))
        else:
            with tmp.open("w", encoding="utf-8") as handle:
                handle.writelines(_jsonl_lines(vectors, texts_in, column))


def _jsonl_lines(vectors: Any, texts_in: Any, column: str) -> Any:
    """One JSON object per row: the input record (or {"text": ...}) plus the vectors under `column`.

    A record's own field of that name is replaced (the caller refused that unless the name was chosen).
    """
    import json

    key = json.dumps(column, ensure_ascii=False)
    for i, row in enumerate(vectors):
        record = dict(texts_in.records[i]) if texts_in.records is not None else {"text": texts_in.texts[i]}
        record.pop(column, None)
        head = json.dumps(record, ensure_ascii=False)[:-1]
        # %.9g round-trips float32 exactly and keeps lines far shorter than repr of a float64.
        numbers = ",".join(f"{v:.9g}" for v in row.tolist())
        yield f"{head}{', ' if record else ''}{key}: [{numbers}]}}\n"
