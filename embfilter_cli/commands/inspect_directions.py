"""`embfilter inspect directions`: top tokens of singular directions, summarised per part of the band."""

from __future__ import annotations

from typing import Any

import click

from embfilter_cli.commands._inspect_common import (
    GROUP_LABELS,
    band_for,
    band_options,
    band_text,
    check_band_conflict,
    echo_table,
    filter_option,
    load_target,
    model_options,
)
from embfilter_cli.commands._options import output_options
from embfilter_cli.errors import UsageError


@click.command()
@model_options
@filter_option
@click.option(
    "--band",
    "band_sel",
    default=None,
    metavar="START:STOP",
    help="Show these directions (half-open, by decreasing σ; e.g. 0:8, 560:, 5).",
)
@click.option("--removed", is_flag=True, help="Show the directions the band removes (the default).")
@click.option("--kept", is_flag=True, help="Show the directions the band keeps.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Tokens per direction and sign.")
@click.option(
    "--summary-per-group",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Directions per band group averaged in the Zipf summary (evenly spaced; 0 = all).",
)
@band_options
@output_options
def directions(
    model: str | None,
    revision: str | None,
    filter_: str | None,
    band_sel: str | None,
    removed: bool,
    kept: bool,
    top: int,
    summary_per_group: int,
    rank: int | None,
    bottom: int | None,
    ratio: float | None,
    start: int | None,
    keep: int | None,
    json_: bool,
) -> None:
    """Top tokens of singular directions at both signs, with English word frequencies (Zipf).

    The summary averages the Zipf frequency of the top tokens of each part of the band — removed
    top, kept, removed bottom — to check whether the edge directions write frequent words.
    The band comes from --filter, else from --rank/--bottom/--ratio/--start/--keep (default:
    the top min(64, d/8) removed).

    \b
    Examples:
      embfilter inspect directions --model smollm2-135m --band 0:8 --top 12
      embfilter inspect directions --filter artifacts/smollm2-135m-r64-b16.safetensors --kept --json
    """
    if sum([band_sel is not None, removed, kept]) > 1:
        raise UsageError("choose one of --band, --removed and --kept")
    from embfilter_cli.text.directions import (
        DirectionSource,
        band_groups,
        describe_directions,
        parse_selection,
        selection_indices,
    )

    if band_sel is not None:
        parse_selection(band_sel)  # syntax errors before loading anything
    check_band_conflict(filter_ is not None, rank, bottom, ratio, start, keep)
    from embfilter_cli.console import emit_json, info, warn
    from embfilter_cli.errors import MissingDependencyError
    from embfilter_cli.text.lens import direction_tokens, evenly_spaced
    from embfilter_cli.text.tokens import english_zipf

    ctx = load_target(model, revision, filter_)
    d = ctx.unemb.hidden_size
    band, band_source = band_for(d, ctx.artifact, rank, bottom, ratio, start, keep)
    if band.hidden_size != d:
        from embfilter_cli.errors import BandError

        raise BandError(f"the band is for a hidden size of {band.hidden_size} but W_U has {d} columns")
    groups = band_groups(band)
    if band_sel is not None:
        shown, selection = selection_indices(band_sel, d), band_sel
    elif kept:
        shown, selection = groups["kept"], "kept"
    else:
        shown, selection = groups["removed_top"] + groups["removed_bottom"], "removed"
    used = {name: evenly_spaced(idx, summary_per_group) for name, idx in groups.items()}
    needed = sorted(set(shown).union(*used.values()))
    try:
        zipf = english_zipf()
    except MissingDependencyError as exc:
        warn(f"{exc}; Zipf frequencies are left out")
        zipf = None

    source = DirectionSource(ctx.unemb.matrix, ctx.artifact, band, log=info)
    vecs, sigmas = source.get(needed)
    toks = direction_tokens(ctx.unemb.matrix, vecs, top, valid_rows=ctx.valid_rows)
    shown_entries, summary = describe_directions(shown, groups, used, needed, sigmas, toks, ctx.vocab, zipf, band, top)
    document = {
        "model_source": ctx.location.source,
        "unembedding_sha256": ctx.unemb.sha256,
        "hidden_size": d,
        "vocab_rows": ctx.valid_rows,
        "filter": str(ctx.artifact.path) if ctx.artifact is not None else None,
        "band": band.as_dict(),
        "band_source": band_source,
        "selection": selection,
        "top": top,
        "directions": shown_entries,
        "summary": summary,
    }
    if json_:
        emit_json(document)
        return
    _print_directions(document, zipf is not None)


def _fmt_token(entry: dict[str, Any], with_zipf: bool) -> str:
    if with_zipf and entry.get("zipf") is not None:
        return f"{entry['text']}[{entry['zipf']:.1f}]"
    return entry["text"]


def _print_directions(doc: dict[str, Any], with_zipf: bool) -> None:
    from embfilter_cli.console import out_text

    origin = {"filter": f"from {doc['filter']}", "default": "default", "options": "from the options"}[
        doc["band_source"]
    ]
    out_text(f"model: {doc['model_source']}  (W_U {doc['vocab_rows']}×{doc['hidden_size']})")
    out_text(f"band ({origin}): {band_text(doc['band'])}")
    note = (
        "; [z] = Zipf word frequency (7 ≈ 'the', 3 ≈ rare), · = space, ⏎ = newline"
        if with_zipf
        else "; · = space, ⏎ = newline"
    )
    out_text(f"top {doc['top']} tokens of W_U·v at both signs{note}")
    out_text("")
    rows = [["dir", "σ", "group", "sign", "top tokens"]]
    for entry in doc["directions"]:
        for sign, key in (("+", "positive"), ("−", "negative")):
            head = (
                [str(entry["index"]), f"{entry['sigma']:.4g}", GROUP_LABELS[entry["group"]]]
                if sign == "+"
                else ["", "", ""]
            )
            rows.append([*head, sign, "  ".join(_fmt_token(t, with_zipf) for t in entry[key])])
    echo_table(rows, right={0, 1})
    out_text("")
    out_text(
        "summary per part of the band: Zipf frequency of the top tokens that are words "
        "(both signs pooled, and of each direction's more frequent sign)"
    )
    srows = [["group", "directions", "used", "top tokens", "words", "mean Zipf", "frequent sign"]]

    def num(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    for s in doc["summary"]:
        words = "—" if s["words"] is None else f"{s['words']} ({100 * s['words'] / max(s['tokens'], 1):.0f}%)"
        srows.append(
            [
                GROUP_LABELS[s["group"]],
                f"{s['first']}..{s['last']}",
                str(s["directions_used"]),
                str(s["tokens"]),
                words,
                num(s["mean_zipf"]),
                num(s["mean_zipf_frequent_sign"]),
            ]
        )
    echo_table(srows, right={2, 3, 4, 5, 6})
