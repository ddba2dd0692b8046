"""`embfilter inspect`: what the unembedding's directions write, and what a filter removes.

Subcommands: `text` (logit lens on pooled text embeddings, before/after a filter), `directions`
(top tokens of singular directions with English word frequencies, summarised per band) and
`spectrum` (the singular values with the band marked). Bare `embfilter inspect` shows the
removed directions of the newest artifact in ./artifacts, else of the default model with the
top 64 removed.

Only click is imported here; the work happens in `embfilter_cli.text.directions`, `embfilter_cli.text.lens`
and `embfilter_cli.text.tokens`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from embfilter_cli.commands._options import (
    MAX_TEXT_BATCH,
    FiniteFloat,
    device_option,
    force_option,
    model_cache_option,
    output_options,
)
from embfilter_cli.errors import UsageError
from embfilter_cli.text.directions import DEFAULT_RANK

F = TypeVar("F", bound=Callable[..., Any])

GROUP_LABELS = {"removed_top": "removed top", "kept": "kept", "removed_bottom": "removed bottom"}


# --------------------------------------------------------------------------- shared options


def _model_options(func: F) -> F:
    func = click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")(func)
    func = click.option(
        "-m",
        "--model",
        "model",
        default=None,
        metavar="SPEC",
        help="Alias, Hub id, model folder, .safetensors or .gguf file. Default: the filter's "
        "model, else the built-in SmolLM2-135M-Instruct GGUF.",
    )(func)
    return func


def _filter_option(func: F) -> F:
    return click.option(
        "--filter",
        "filter_",
        default=None,
        type=click.Path(dir_okay=False),
        metavar="FILTER",
        help="A filter artifact from `embfilter fit` (must be fitted on the same model).",
    )(func)


def _band_options(func: F) -> F:
    """The filter band when no --filter is given (same meaning as in `embfilter fit`)."""
    for name, kind, text in reversed(
        [
            (
                "--rank",
                click.IntRange(min=0),
                f"Remove the top R directions. [default: min({DEFAULT_RANK}, d/8) when no band is given]",
            ),
            ("--bottom", click.IntRange(min=0), "Also remove the lowest B directions."),
            ("--ratio", FiniteFloat(1.0), "The paper's preset: keep the central d // τ directions."),
            ("--start", click.IntRange(min=0), "Explicit window: first kept direction (0-based)."),
            (
                "--keep",
                click.IntRange(min=1),
                "Number of kept directions (with --start or --ratio, or alone: centred).",
            ),
        ]
    ):
        func = click.option(name, type=kind, default=None, help=text)(func)
    return func


# --------------------------------------------------------------------------- group


@click.group(name="inspect", invoke_without_command=True)
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Tokens per direction and sign.")
@output_options
@click.pass_context
def inspect_group(ctx: click.Context, top: int, json_: bool) -> None:
    """See what W_U's singular directions write and what a filter removes.

    \b
    Without a subcommand: the removed directions of the newest filter in ./artifacts, or of the
    default model with the top 64 directions removed when there is none.

    \b
    Examples:
      embfilter inspect
      embfilter inspect text --model smollm2-135m "The cat sat on the mat." --filter F
      embfilter inspect directions --model smollm2-135m --band 0:8 --top 12
      embfilter inspect directions --filter F --removed --json
      embfilter inspect spectrum --model smollm2-135m --rank 64 --bottom 16 --plot spectrum.png
    """
    if ctx.invoked_subcommand is not None:
        return
    from embfilter_cli.console import info
    from embfilter_cli.errors import ArtifactError, ModelNotFoundError
    from embfilter_cli.filters.artifact import DEFAULT_ARTIFACT_DIR, newest_artifact
    from embfilter_cli.model.locate import resolve_model

    try:
        newest = newest_artifact()
    except ArtifactError:
        newest = None
    if newest is not None:
        info(f"Newest filter in {DEFAULT_ARTIFACT_DIR}/: {newest}")
        ctx.invoke(directions, filter_=str(newest), removed=True, top=top, json_=json_)
        return
    try:
        resolve_model(None)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"no filter in {DEFAULT_ARTIFACT_DIR}/ and no default model: {exc}; or run "
            "`embfilter inspect directions --model SPEC`"
        ) from exc
    info(
        f"No filter in {DEFAULT_ARTIFACT_DIR}/; showing the default model with the top {DEFAULT_RANK} directions removed"
    )
    ctx.invoke(directions, removed=True, top=top, json_=json_)


# --------------------------------------------------------------------------- loading helpers


class _Context:
    """W_U, its vocabulary and the (optional) filter, resolved and checked against each other."""

    def __init__(
        self, model: str | None, revision: str | None, filter_path: str | None, need_matrix: bool = True
    ) -> None:
        from embfilter_cli.console import info
        from embfilter_cli.filters.artifact import load_artifact

        self.artifact = load_artifact(filter_path) if filter_path else None
        self.spec: str | None = model
        self.location: Any = None
        self.unemb: Any = None
        self.vocab: Any = None
        if not need_matrix:  # everything needed is in the artifact; the model need not exist here
            return
        from embfilter_cli.model.head import locate_for_filter, read_head, read_head_for_filter

        self.spec, self.location = locate_for_filter(model, revision, self.artifact)
        info(f"Model: {self.location.source}")
        self.unemb = (
            read_head_for_filter(self.location, self.artifact)
            if self.artifact is not None
            else read_head(self.location)
        )
        self._load_vocab()

    def _load_vocab(self) -> None:
        from embfilter_cli.console import warn
        from embfilter_cli.text.tokens import Vocabulary, load_vocabulary

        vocab = load_vocabulary(self.location)
        if vocab is None:
            warn(f"no tokenizer files found for {self.location.source}; tokens are shown as <id N>")
            vocab = Vocabulary([], "plain", set(), "")
        self.vocab = vocab

    @property
    def valid_rows(self) -> int:
        """Rows that are real tokens: padding rows past the tokenizer's vocabulary are masked."""
        rows = self.unemb.vocab_size
        return min(rows, len(self.vocab)) if self.vocab is not None and len(self.vocab) else rows


def _check_band_conflict(has_filter: bool, *band_values: Any) -> None:
    """A usage error, raised before anything is loaded, for a filter plus band options."""
    if has_filter and any(v is not None for v in band_values):
        raise UsageError("--filter already fixes the band; drop --rank/--bottom/--ratio/--start/--keep")


def _band_for(
    hidden_size: int,
    artifact: Any,
    rank: int | None,
    bottom: int | None,
    ratio: float | None,
    start: int | None,
    keep: int | None,
) -> tuple[Any, str]:
    """The filter band (from the artifact or the band options) and where it came from."""
    from embfilter_cli.text.directions import choose_band

    _check_band_conflict(artifact is not None, rank, bottom, ratio, start, keep)
    return choose_band(hidden_size, artifact, rank, bottom, ratio, start, keep)


def _echo_table(rows: list[list[str]], right: frozenset[int] | set[int] = frozenset()) -> None:
    """Print aligned columns (display-width aware) on stdout."""
    from rich.cells import cell_len

    from embfilter_cli.console import out_text

    if not rows:
        return
    widths = [max(cell_len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        cells = []
        for c, cell in enumerate(row):
            pad = widths[c] - cell_len(cell)
            last = c == len(row) - 1
            cells.append(" " * pad + cell if c in right else (cell if last else cell + " " * pad))
        out_text("  ".join(cells).rstrip())


# --------------------------------------------------------------------------- directions


@inspect_group.command()
@_model_options
@_filter_option
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
@_band_options
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
    _check_band_conflict(filter_ is not None, rank, bottom, ratio, start, keep)
    from embfilter_cli.console import emit_json, info, warn
    from embfilter_cli.errors import MissingDependencyError
    from embfilter_cli.text.lens import direction_tokens, evenly_spaced
    from embfilter_cli.text.tokens import english_zipf

    ctx = _Context(model, revision, filter_)
    d = ctx.unemb.hidden_size
    band, band_source = _band_for(d, ctx.artifact, rank, bottom, ratio, start, keep)
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


def _band_text(band: dict[str, int]) -> str:
    last = band["start"] + band["keep"] - 1
    return f"remove top {band['top']}, keep {band['start']}..{last} ({band['keep']}), remove bottom {band['bottom']}"


def _print_directions(doc: dict[str, Any], with_zipf: bool) -> None:
    from embfilter_cli.console import out_text

    origin = {"filter": f"from {doc['filter']}", "default": "default", "options": "from the options"}[
        doc["band_source"]
    ]
    out_text(f"model: {doc['model_source']}  (W_U {doc['vocab_rows']}×{doc['hidden_size']})")
    out_text(f"band ({origin}): {_band_text(doc['band'])}")
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
    _echo_table(rows, right={0, 1})
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
    _echo_table(srows, right={2, 3, 4, 5, 6})


# --------------------------------------------------------------------------- text


@inspect_group.command()
@click.argument("texts", nargs=-1)
@_model_options
@_filter_option
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
    from embfilter_cli.console import emit_json, info, out_text, warn
    from embfilter_cli.errors import InputDataError
    from embfilter_cli.text.directions import token_entries
    from embfilter_cli.text.embedding import check_pooling, load_encoder, resolve_recipe
    from embfilter_cli.text.lens import lens_embeddings

    items = _collect_texts(texts, warn)
    if not items:
        raise UsageError("give at least one TEXT argument (or - to read texts from stdin)")
    check_pooling(pooling)
    rec = resolve_recipe(recipe)  # a bad template fails before the model loads
    ctx = _Context(model, revision, filter_)
    if ctx.artifact is not None:
        from embfilter_cli.filters.centering import check_centering_use

        check_centering_use(ctx.artifact.centering, pooling, rec.name, rec.template, str(ctx.artifact.path))

    info(f"Embedding {len(items)} text(s): pooling={pooling}, recipe={recipe}")
    encoder = load_encoder(ctx.spec, device=device, dtype=dtype, revision=revision, use_cache=not no_cache, notify=info)
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
        out_text(f"filter: {art.path} ({_band_text(art.band)}{centred})")
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
        _echo_table(rows, right={0, 2, 4})


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


# --------------------------------------------------------------------------- spectrum


@inspect_group.command()
@_model_options
@_filter_option
@_band_options
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE.png",
    help="Also save a plot (png, svg or pdf; needs matplotlib: pip install 'embfilter[plot]').",
)
@click.option(
    "--width",
    type=click.IntRange(min=8, max=1000),
    default=72,
    show_default=True,
    help="Sparkline width in characters.",
)
@force_option
@output_options
def spectrum(
    model: str | None,
    revision: str | None,
    filter_: str | None,
    rank: int | None,
    bottom: int | None,
    ratio: float | None,
    start: int | None,
    keep: int | None,
    plot: str | None,
    width: int,
    force: bool,
    json_: bool,
) -> None:
    """The singular values of W_U with the band marked: a log-scale sparkline, and a plot with --plot.

    With --filter alone the values stored in the filter are shown (no model is read); with
    --model they are computed exactly (float64 Gram + eigh).

    \b
    Examples:
      embfilter inspect spectrum --model smollm2-135m --rank 64 --bottom 16
      embfilter inspect spectrum --filter F --plot spectrum.png
    """
    import numpy as np

    from embfilter_cli.console import emit_json, info
    from embfilter_cli.text.directions import energy_removed

    _check_band_conflict(filter_ is not None, rank, bottom, ratio, start, keep)
    if plot is not None:
        from embfilter_cli.files import check_writable

        fmt = plot.rsplit(".", 1)[-1].lower() if "." in plot else ""
        if fmt not in ("png", "svg", "pdf"):
            raise click.BadParameter(f"{plot!r} must end in .png, .svg or .pdf", param_hint="--plot")
        check_writable(plot, force)  # before any decomposition
        from embfilter_cli.text.plots import require_matplotlib

        require_matplotlib()
    if filter_ is not None and model is None:
        ctx = _Context(None, revision, filter_, need_matrix=False)
        art = ctx.artifact
        assert art is not None  # filter_ was given
        sigma = np.asarray(art.singular_values, dtype=np.float64)
        d = art.hidden_size
        sha = art.unembedding_sha256
        source = art.model_source
    else:
        from embfilter_cli.filters.solve import exact_spectrum_of

        ctx = _Context(model, revision, filter_)
        art = ctx.artifact
        d = ctx.unemb.hidden_size
        sha = ctx.unemb.sha256
        source = ctx.location.source
        if art is not None and len(art.singular_values) == d:
            sigma = np.asarray(art.singular_values, dtype=np.float64)
        else:
            sigma = exact_spectrum_of(ctx.unemb.matrix, log=info).singular_values
    band, band_source = _band_for(d, art, rank, bottom, ratio, start, keep)
    complete = len(sigma) == d
    energy = None
    if complete:
        energy = energy_removed(sigma, band)
    elif art is not None and "energy_removed" in art.metadata:
        energy = float(art.metadata["energy_removed"])
    plot_path = None
    if plot is not None:
        from embfilter_cli.text.plots import save_spectrum_plot

        plot_path = str(save_spectrum_plot(sigma, band, plot, title=source, force=force))
        info(f"Saved {plot_path}")
    document = {
        "model_source": source,
        "unembedding_sha256": sha,
        "hidden_size": d,
        "filter": str(art.path) if art is not None else None,
        "band": band.as_dict(),
        "band_source": band_source,
        "energy_removed": None if energy is None else round(energy, 6),
        "singular_values": [float(s) for s in sigma],
        "plot": plot_path,
    }
    if json_:
        emit_json(document)
        return
    _print_spectrum(document, sigma, band, width)


def _print_spectrum(doc: dict[str, Any], sigma: Any, band: Any, width: int) -> None:
    from embfilter_cli.console import out_text
    from embfilter_cli.text.directions import band_marks, sparkline

    n, d = len(sigma), doc["hidden_size"]
    origin = {"filter": f"from {doc['filter']}", "default": "default", "options": "from the options"}[
        doc["band_source"]
    ]
    line, spans = sparkline(sigma, width)
    per = max(b - a + 1 for a, b in spans) if spans else 0
    out_text(f"model: {doc['model_source']}  (hidden size {d}{'' if n == d else f', {n} values computed'})")
    out_text(f"band ({origin}): {_band_text(doc['band'])}")
    if doc["energy_removed"] is not None:
        out_text(f"energy removed: {100 * doc['energy_removed']:.2f}% of ‖W_U‖²_F")
    out_text(f"σ on a log scale, {per if per > 1 else 1} direction(s) per column; × removed, ─ kept, ┼ band edge")
    out_text(line)
    out_text(band_marks(spans, band))
    out_text(f"σ_0 = {sigma[0]:.4g}   σ_{n - 1} = {sigma[-1]:.4g}")
    rows = [["", "index", "σ"]]
    for label, idx in (
        ("last removed top", band.start - 1),
        ("first kept", band.start),
        ("last kept", band.stop - 1),
        ("first removed bottom", band.stop if band.bottom else -1),
    ):
        if 0 <= idx < n:
            rows.append([label, str(idx), f"{sigma[idx]:.4g}"])
    _echo_table(rows, right={1, 2})
