"""`embfilter inspect text`: logit lens on pooled text embeddings, before and after a filter."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from embfilter_cli.commands._inspect_common import (
    band_text,
    echo_table,
    filter_option,
    load_target,
    model_options,
)
from embfilter_cli.commands._options import MAX_TEXT_BATCH, device_option, model_cache_option, output_options
from embfilter_cli.errors import UsageError


@click.command()
@click.argument("texts", nargs=-1)
@model_options
@filter_option
@click.option(
    "--pooling",
    type=click.Choice(["mean", "last"]),
    default="mean",
    show_default=True,
    help="Mean over tokens, or the last token (left padding).",
)
@click.option(
    "--recipe",
    default="none",
    show_default=True,
    metavar="NAME|TEMPLATE",
    help="none, prompteol, summarize, echo, or a template containing {text}.",
)
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Tokens per text.")
@click.option("--max-length", type=click.IntRange(min=1), default=512, show_default=True, help="Truncate longer texts.")
@click.option("--batch-size", type=click.IntRange(1, MAX_TEXT_BATCH), default=16, show_default=True)
@device_option
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Model weights dtype for the forward pass.",
)
@model_cache_option
@output_options
def text(
    texts: tuple[str, ...],
    model: str | None,
    revision: str | None,
    filter_: str | None,
    pooling: str,
    recipe: str,
    top: int,
    max_length: int,
    batch_size: int,
    device: str,
    dtype: str,
    no_cache: bool,
    json_: bool,
) -> None:
    """Logit lens on pooled text embeddings: top tokens of W_U·e, before and after the filter.

    After = W_U·Pᵀ·P·e, the part of e the filter keeps; for a centred filter (y = P·x − m) after =
    W_U·Pᵀ·(P·e − m), which subtracts the average background text's logits, so the tokens shown
    are those that set the text apart. A centred filter must be used with the --pooling/--recipe it
    was centred with. TEXTS are arguments; `-` reads one text per line from stdin (empty lines are
    skipped with a warning).

    \b
    Examples:
      embfilter inspect text "The cat sat on the mat." "Stocks fell." --filter F
      echo "A dog ran in the park." | embfilter inspect text - --pooling last --recipe prompteol --json
    """
    from embfilter_cli.console import emit_json, info, notice, out_text, warn
    from embfilter_cli.errors import InputDataError
    from embfilter_cli.text.directions import token_entries
    from embfilter_cli.text.embedding import load_encoder
    from embfilter_cli.text.lens import lens_embeddings
    from embfilter_cli.text.recipes import check_pooling, resolve_recipe

    items = _collect_texts(texts, warn)
    if not items:
        raise UsageError("give at least one TEXT argument (or - to read texts from stdin)")
    check_pooling(pooling)
    rec = resolve_recipe(recipe)  # a bad template fails before the model loads
    ctx = load_target(model, revision, filter_)
    if ctx.artifact is not None:
        from embfilter_cli.filters.centering import check_centering_use

        check_centering_use(ctx.artifact.centering, pooling, rec.name, rec.template, str(ctx.artifact.path))

    info(f"Embedding {len(items)} text(s): pooling={pooling}, recipe={recipe}")
    encoder = load_encoder(
        ctx.spec, device=device, dtype=dtype, revision=revision, use_cache=not no_cache, notify=notice
    )
    embeddings = encoder.embed(items, pooling=pooling, recipe=recipe, batch_size=batch_size, max_length=max_length)
    if embeddings.shape[1] != ctx.unemb.hidden_size:
        raise InputDataError(
            f"the encoder returned {embeddings.shape[1]}-dim embeddings but W_U has {ctx.unemb.hidden_size} columns; "
            "the model's hidden states do not match its head"
        )
    art = ctx.artifact
    result = lens_embeddings(
        ctx.unemb.matrix,
        embeddings,
        top,
        projection=art.projection if art is not None else None,
        mean=art.mean if art is not None else None,
        valid_rows=ctx.valid_rows,
    )
    vocab = ctx.vocab
    entries: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        before = token_entries(vocab, result.before.indices[n], result.before.values[n])
        after = None
        if result.after is not None:
            after = token_entries(vocab, result.after.indices[n], result.after.values[n])
        entries.append({"text": item, "before": before, "after": after})
    document = {
        "model_source": ctx.location.source,
        "unembedding_sha256": ctx.unemb.sha256,
        "filter": str(art.path) if art is not None else None,
        "band": art.band if art is not None else None,
        "centered": art.centered if art is not None else None,
        "pooling": pooling,
        "recipe": recipe,
        "top": top,
        "texts": entries,
    }
    if json_:
        emit_json(document)
        return
    if art is None:
        info("No --filter given: showing the raw embedding only")
    out_text(f"model: {document['model_source']}  pooling={pooling} recipe={recipe}")
    if art is not None:
        centred = f"; centred: {c.describe()}" if (c := art.centering) is not None else ""
        out_text(f"filter: {art.path} ({band_text(art.band)}{centred})")
    for n, entry in enumerate(entries, 1):
        out_text("")
        out_text(f"[{n}] {entry['text']}")
        header = ["#", "before", "logit"] + (["after", "logit"] if entry["after"] is not None else [])
        rows = [header]
        for r, tok in enumerate(entry["before"]):
            row = [str(r + 1), tok["text"], f"{tok['logit']:.3f}"]
            if entry["after"] is not None:
                aft = entry["after"][r] if r < len(entry["after"]) else None
                row += [aft["text"], f"{aft['logit']:.3f}"] if aft else ["", ""]
            rows.append(row)
        echo_table(rows, right={0, 2, 4})


def _collect_texts(texts: tuple[str, ...], warn: Callable[[str], None]) -> list[str]:
    """Arguments as given; `-` expands to the non-empty lines of stdin."""
    from embfilter_cli.errors import InputDataError

    items: list[str] = []
    for n, item in enumerate(texts, 1):
        if item == "-":
            for line_no, line in enumerate(sys.stdin, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    warn(f"stdin line {line_no} is empty; skipped")
                    continue
                items.append(line)
        elif not item.strip():
            raise InputDataError(f"TEXT argument {n} is empty; give a non-empty text")
        else:
            items.append(item)
    return items
