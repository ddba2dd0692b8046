"""`embfilter center`: (re)centre an existing filter on a background set, without refitting."""

from __future__ import annotations

from typing import Any

import click

from embfilter_cli.commands._options import (
    device_option,
    embedding_options,
    force_option,
    output_options,
)
from embfilter_cli.commands._self_options import self_sampling_of, self_sampling_options


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
    **self_opts: Any,  # --self-* and --save-texts (`_self_options.self_sampling_options`)
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
    from embfilter_cli.api.centring import centre_on, centring_summary
    from embfilter_cli.commands._hooks import console_hooks
    from embfilter_cli.files import check_writable
    from embfilter_cli.filters.artifact import load_artifact, save_artifact

    check_writable(output, force)
    artifact = load_artifact(filter_path)
    centred, report = centre_on(
        artifact,
        texts,
        model=model,
        revision=revision,
        pooling=pooling,
        recipe=recipe,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        input_format=input_format,
        hooks=console_hooks(),
        sampling=self_sampling_of(self_opts),
        save_texts=self_opts["save_texts"],
        force=force,
    )
    save_artifact(centred, output, force=force)
    summary = centring_summary(centred, report)
    summary["filter"] = str(artifact.path)
    if json_:
        from embfilter_cli.console import emit_json

        emit_json(summary)
    else:
        print_centring(summary)


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
