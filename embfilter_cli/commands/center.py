"""`embfilter center`: (re)centre an existing filter on a background set, without refitting."""

from __future__ import annotations

from typing import Any

import click

from embfilter_cli.commands._options import (
    device_option,
    embedding_options,
    force_option,
    output_options,
    self_sampling_options,
)


@click.command()
@click.argument("filter_path", metavar="FILTER")
@click.argument("texts", metavar="TEXTS")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the centred filter."
)
@click.option(
    "-m",
    "--model",
    "model",
    default=None,
    metavar="SPEC",
    help="The model that embeds TEXTS [default: the one the filter was fitted on]. Its W_U must match the filter's.",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")
@embedding_options
@self_sampling_options
@device_option
@force_option
@output_options
def center(
    filter_path: str,
    texts: str,
    output: str,
    model: str | None,
    revision: str | None,
    pooling: str,
    recipe: str,
    batch_size: int,
    max_length: int,
    dtype: str,
    input_format: str,
    device: str,
    force: bool,
    json_: bool,
    **self_opts: Any,  # --self-* and --save-texts (`_options.self_sampling_options`)
) -> None:
    """Centre FILTER on the mean of the filtered TEXTS, writing a new filter (y = P·x − m).

    \b
    TEXTS is a background set of unlabeled texts from the domain you will embed (one per line,
    JSONL with a `text` field, or - for stdin), embedded with the filter's model and the given
    --pooling/--recipe; or a .npy of raw (n, d) embeddings you made the same way (no model run;
    the --pooling/--recipe/--max-length you give are recorded as how they were made); or `self`:
    texts the model samples itself (no data needed; --self-* options; cached under
    $EMBFILTER_CACHE/self-texts, so centring for another recipe does not sample again).
    The projection P is kept; a filter that already has a mean gets the new one instead.
    Use the centred filter only with the same --pooling and --recipe (embed, eval and inspect refuse
    any other); centre again for another recipe or domain.

    \b
    Examples:
      embfilter center artifacts/f.safetensors background.txt -o artifacts/f-news.safetensors
      embfilter center F docs.jsonl --pooling last --recipe summarize -o F-summarize.safetensors
      embfilter center F raw_background.npy -o F2.safetensors
      embfilter center F self --pooling last --recipe prompteol -o F-self-prompteol.safetensors
    """
    from embfilter_cli.console import info
    from embfilter_cli.files import check_writable
    from embfilter_cli.filters.artifact import load_artifact, save_artifact
    from embfilter_cli.text.background import check_background_dim

    check_writable(output, force)
    artifact = load_artifact(filter_path)
    background = read_background_for(texts, pooling, recipe, input_format, self_opts, force)
    check_background_dim(background, artifact.hidden_size, str(artifact.path))
    location = None
    if background.embeddings is None:
        location = _filter_model(artifact, model, revision)
        info(f"Model: {location.source} ({location.kind.replace('_', ' ')})")
    centred, report = centre_logged(
        artifact, background, location, pooling, recipe, max_length, batch_size, device, dtype, self_opts, force
    )
    save_artifact(centred, output, force=force)
    summary = centring_summary(centred, report)
    summary["filter"] = str(artifact.path)
    if json_:
        from embfilter_cli.console import emit_json

        emit_json(summary)
    else:
        print_centring(summary)


def read_background_for(
    texts: str,
    pooling: str,
    recipe: str,
    input_format: str,
    self_opts: dict[str, Any] | None = None,
    force: bool = False,
) -> Any:
    """Check --pooling/--recipe, read the background (texts, .npy, or "self") and warn about skipped blank lines.

    Shared with `fit --center-on`, which calls it before the decomposition so bad input fails at once.
    `self_opts` holds the --self-* options (how "self" samples) and --save-texts (writable, "self" only).
    """
    from embfilter_cli.text.self_samples import SelfSampling

    opts = self_opts or {}
    save_texts = opts.get("save_texts")
    sampling = (
        SelfSampling(*(opts[k] for k in ("self_count", "self_tokens", "self_temperature", "self_seed", "self_start")))
        if opts
        else None
    )
    from embfilter_cli.console import warn
    from embfilter_cli.text.background import read_background
    from embfilter_cli.text.recipes import check_pooling, resolve_recipe
    from embfilter_cli.text.texts import describe_skipped

    check_pooling(pooling)
    resolve_recipe(recipe)  # a bad template fails before anything is read or loaded
    if save_texts is not None:
        from embfilter_cli.errors import UsageError
        from embfilter_cli.files import check_writable

        if texts != "self":
            raise UsageError(f"--save-texts keeps the texts of --center-on self; the background here is {texts}")
        check_writable(save_texts, force)
    background = read_background(texts, input_format, sampling=sampling)
    if background.skipped:
        warn(describe_skipped(background.skipped))
    return background


def centre_logged(
    artifact: Any,
    background: Any,
    location: Any,
    pooling: str,
    recipe: str,
    max_length: int,
    batch_size: int,
    device: str,
    dtype: str,
    self_opts: dict[str, Any] | None = None,
    force: bool = False,
) -> tuple[Any, Any]:
    """`text.background.centre_filter` with info lines, progress bars and the truncation warning.

    A "self" background is sampled first (its own bar; `self_opts["save_texts"]`, if set, then
    receives the texts as JSONL).
    """
    save_texts = (self_opts or {}).get("save_texts")
    from embfilter_cli.console import info, notice, progress_bar, warn
    from embfilter_cli.text.background import centre_filter, sample_background
    from embfilter_cli.text.self_samples import save_texts_jsonl

    encoder = None
    if background.pending:
        s = background.sampling
        info(
            f"Sampling {s.count} texts of up to {s.new_tokens} tokens from the model (temperature {s.temperature:g}, seed {s.seed})…"
        )
        with progress_bar("Sampling", s.count) as progress:
            background, encoder = sample_background(
                background, location, device=device, dtype=dtype, progress=progress, notify=notice
            )
        info(f"Sampled {background.count} texts" + (" (from the cache)" if encoder is None else ""))
        if save_texts is not None:
            save_texts_jsonl(background.texts, save_texts, force)
            info(f"Wrote the sampled texts to {save_texts}")
    what = "texts" if background.embeddings is None else "pre-computed embeddings"
    info(f"Centring on {background.count} {what} from {background.input} ({pooling} pooling, recipe {recipe})…")
    with progress_bar("Embedding", background.count) as progress:
        centred, report = centre_filter(
            artifact,
            background,
            location=location,
            pooling=pooling,
            recipe=recipe,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress,
            encoder=encoder,
        )
    if report.truncated:
        warn(f"{report.truncated} background text(s) exceeded --max-length {max_length} tokens and were cut")
    return centred, report


def _filter_model(artifact: Any, model: str | None, revision: str | None) -> Any:
    """Resolve --model (default: the filter's own model) and refuse one with another W_U."""
    from embfilter_cli.model.head import locate_for_filter, read_head_for_filter

    _, location = locate_for_filter(model, revision, artifact)
    read_head_for_filter(location, artifact)
    return location


def centring_summary(artifact: Any, report: Any) -> dict[str, Any]:
    """JSON-ready facts about a freshly centred filter (shared with `fit --center-on`)."""
    return {
        "output": str(artifact.path),
        "output_dim": artifact.output_dim,
        "centering": artifact.centering.as_dict(),
        "mean_sha256": artifact.metadata["mean_sha256"],
        "mean_norm": report.mean_norm,
        "truncated": report.truncated,
        "seconds": round(report.seconds, 3),
    }


def print_centring(summary: dict[str, Any]) -> None:
    """Print the centring summary as a table on stdout."""
    from embfilter_cli.console import key_value_table, print_table

    c = summary["centering"]
    table = key_value_table()
    if "filter" in summary:
        table.add_row("filter", summary["filter"])
    what = "texts" if c["source"] == "texts" else "pre-computed embeddings"
    if (sampled := c.get("sampling")) is not None:
        what = (
            f"texts sampled by the model ({sampled['new_tokens']} new tokens from {sampled['start']}, temperature "
            f"{sampled['temperature']:g}, seed {sampled['seed']}, {sampled['dtype']} on {sampled['device']})"
        )
    table.add_row("background", f"{c['input']}: {c['count']} {what}")
    table.add_row("embedded as", f"{c['pooling']} pooling, recipe {c['recipe']}, max length {c['max_length']}")
    table.add_row("mean", f"‖m‖ = {summary['mean_norm']:.4g} over {summary['output_dim']} dims (y = P·x − m)")
    table.add_row("sha256(texts)" if c["source"] == "texts" else "sha256(.npy)", c["sha256"])
    table.add_row("saved", summary["output"])
    print_table(table)
