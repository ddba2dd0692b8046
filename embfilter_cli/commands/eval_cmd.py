"""`embfilter eval`: Spearman/Pearson of cosine vs human scores for raw, filtered and swept bands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from embfilter_cli.commands._options import MAX_TEXT_BATCH, device_option, force_option, output_options, self_option


@click.command("eval")
@click.option(
    "-m",
    "--model",
    "model",
    default=None,
    metavar="SPEC",
    help="Alias, Hub id, model folder or .gguf file. Default: the built-in SmolLM2-135M-Instruct GGUF.",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option(
    "--data",
    "data_spec",
    required=True,
    metavar="lee|FILE.tsv",
    help="lee (Lee 2005 documents, from the gensim wheel) or a TSV of text1<TAB>text2<TAB>score rows.",
)
@click.option("--pooling", type=click.Choice(["mean", "last"]), default="mean", show_default=True)
@click.option(
    "--recipe",
    default="none",
    show_default=True,
    metavar="NAME|TEMPLATE",
    help="none, prompteol, summarize, echo, or a custom template containing {text}.",
)
@click.option(
    "--filter",
    "filter_paths",
    multiple=True,
    metavar="FILTER",
    help="Evaluate this filter artifact (repeatable); a centred one is applied with its mean and "
    "must have been centred with this --pooling/--recipe.",
)
@click.option("--sweep-top", default=None, metavar="LIST", help="Top-R values to sweep, e.g. 0,4,16,64.")
@click.option("--sweep-bottom", default=None, metavar="LIST", help="Bottom-B values to sweep, e.g. 0,8,16.")
@click.option("--ratio", "ratios", default=None, metavar="LIST", help="Paper presets τ to evaluate, e.g. 1,2,8.")
@click.option(
    "--auto/--no-auto",
    "auto",
    default=True,
    show_default=True,
    help="Also evaluate the data-free `--band auto` choice (whenever bands are evaluated).",
)
@click.option(
    "--background",
    "background_spec",
    default=None,
    metavar="TEXTS",
    help="Unlabeled texts (text/JSONL file as `embed` reads them, or -) for centering and the baselines. "
    "[default for --data lee: lee_background.cor from the gensim wheel; none otherwise]",
)
@click.option("--no-background", is_flag=True, help="No centering rows and no baselines, even for --data lee.")
@self_option
@click.option(
    "--abtt",
    "abtt_list",
    default=None,
    metavar="LIST",
    help="All-but-the-top baselines: remove the mean and the top D principal components. [default: 1,2,4,8]",
)
@click.option(
    "--whiten",
    "whiten_list",
    default=None,
    metavar="LIST",
    help="Whitening baselines to k dims (needs more than k background texts). [default: 64,128,256]",
)
@click.option("--batch-size", type=click.IntRange(1, MAX_TEXT_BATCH), default=16, show_default=True)
@click.option("--max-length", type=click.IntRange(min=1), default=512, show_default=True)
@device_option
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True
)
@click.option(
    "--plot", "plot_path", default=None, metavar="FILE.png", help="Save the sweep as a heatmap (needs matplotlib)."
)
@click.option(
    "--save-best",
    "save_best",
    default=None,
    metavar="PATH",
    help="Write the best band (sweep, ratio or auto) as a filter artifact.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Embedding/spectrum cache [default: $EMBFILTER_CACHE or ~/.cache/embfilter].",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write the cache (a GGUF model is then loaded directly, not from its cached conversion).",
)
@force_option
@output_options
def eval_cmd(
    model: str | None,
    revision: str | None,
    data_spec: str,
    pooling: str,
    recipe: str,
    filter_paths: tuple[str, ...],
    sweep_top: str | None,
    sweep_bottom: str | None,
    ratios: str | None,
    auto: bool,
    background_spec: str | None,
    no_background: bool,
    center_self: bool,
    abtt_list: str | None,
    whiten_list: str | None,
    batch_size: int,
    max_length: int,
    device: str,
    dtype: str,
    plot_path: str | None,
    save_best: str | None,
    cache_dir: str | None,
    no_cache: bool,
    force: bool,
    json_: bool,
) -> None:
    """Score embeddings on human similarity ratings: raw, each --filter, each band of a sweep.

    The model runs ONCE; every band is evaluated on the cached raw embeddings (a band is a linear
    map). With no --filter, --sweep-* or --ratio, a default sweep runs (top 0..128 × bottom 0..64,
    τ = 2, 4, 8, and the auto band). With a background (--background, or by default for --data lee)
    each filter and band is also scored followed by centering on the background's mean, and the
    baselines are added: centering alone, all-but-the-top, whitening, PCA. The best row by
    Spearman (over all rows) is marked ★; it is chosen on this data, so confirm it on held-out
    data before relying on it.

    \b
    Examples:
      embfilter eval --data lee
      embfilter eval --model smollm2-135m --data lee --sweep-top 0,4,16,64,128 --sweep-bottom 0,4,8,16,32,64 --plot heatmap.png
      embfilter eval --model M --data pairs.tsv --filter A.safetensors --filter B.safetensors --json
      embfilter eval --data pairs.tsv --background unlabeled.txt --abtt 1,2 --whiten 128
    """
    from embfilter_cli.text.eval_request import parse_eval_request

    request = parse_eval_request(
        no_background, background_spec, abtt_list, whiten_list, filter_paths, sweep_top, sweep_bottom, ratios
    )
    request.check_outputs(plot=plot_path is not None, save_best=save_best is not None)
    abtt, whiten, tops, bottoms = request.abtt, request.whiten, request.tops, request.bottoms
    ratio_list, needs_spectrum = request.ratios, request.needs_spectrum
    from embfilter_cli.files import check_writable
    from embfilter_cli.text.recipes import resolve_recipe

    rec = resolve_recipe(recipe)
    for path in (plot_path, save_best):
        if path is not None:
            check_writable(path, force)  # before any model work
    if plot_path is not None:
        from embfilter_cli.text.plots import require_matplotlib

        require_matplotlib()

    from embfilter_cli.console import info, notice, progress_bar, warn
    from embfilter_cli.filters.artifact import load_artifact
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.text.cache import Cache, cached_embeddings
    from embfilter_cli.text.datasets import load_dataset
    from embfilter_cli.text.evaluation import eval_document, evaluate_all, head_for_eval

    data = load_dataset(data_spec)
    info(f"Data: {data.name}: {len(data.pairs)} pairs over {len(data.texts)} texts")
    from embfilter_cli.commands._eval_output import load_background_noted, save_best_band, self_sample_embeddings

    background = load_background_noted(no_background, background_spec, data.name, bool(abtt_list or whiten_list))
    filters = [load_artifact(p) for p in filter_paths]
    from embfilter_cli.filters.centering import check_centering_use

    for art in filters:  # a centred filter's mean belongs to one pooling/recipe
        check_centering_use(art.centering, pooling, rec.name, rec.template, str(art.path))
    location = resolve_model(model, revision=revision)
    cache = Cache(Path(cache_dir) if cache_dir else None, enabled=not no_cache, warn=warn, notify=notice)
    facts, spectrum = head_for_eval(location, cache, device, needs_spectrum, filters, log=info)
    embed_options: dict[str, Any] = dict(template=rec.template, pooling=pooling, recipe=recipe, batch_size=batch_size)
    embed_options.update(max_length=max_length, device=device, dtype=dtype, revision=revision, cache=cache)
    embed_options.update(log=info, warn=warn, notify=notice, bar=progress_bar, encoders={})
    embed_options.update(hidden_size=facts.hidden_size if facts is not None else None)
    raw, embed_info = cached_embeddings(location, data, **embed_options)
    bg_raw = bg_info = None
    if background is not None:
        bg_raw, bg_info = cached_embeddings(location, background, what="Background embeddings", **embed_options)
    self_raw = self_sample_embeddings(location, cache, embed_options) if center_self else None
    results, grid = evaluate_all(
        raw,
        data,
        spectrum=spectrum,
        filters=filters,
        ratios=ratio_list,
        tops=tops,
        bottoms=bottoms,
        auto=auto and needs_spectrum,
        background=bg_raw,
        baselines={
            "abtt": abtt,
            "whiten": whiten,
            "skip_impossible": [m for m, given in (("abtt", abtt_list), ("whiten", whiten_list)) if given is None],
            "note": warn,
        },
        self_samples=self_raw,
    )
    best = next((r for r in results if r.best), None)

    saved = None
    if save_best is not None:
        assert spectrum is not None and facts is not None  # needs_spectrum
        saved = save_best_band(results, spectrum, facts, location, data, pooling, recipe, save_best, force)
    if plot_path is not None and grid is not None:
        from embfilter_cli.text.plots import save_sweep_heatmap

        title = f"{data.name}: Spearman by band ({location.source}, {pooling}, {recipe})"
        save_sweep_heatmap(grid, results[0].spearman, plot_path, force, title)
        info(f"Wrote heatmap {plot_path}")
    if best is not None and best.kind == "raw":
        warn("no filter or band beat the raw embedding on this data")

    if json_:
        from embfilter_cli.console import emit_json

        settings = {"pooling": pooling, "recipe": recipe, "template": rec.template, "max_length": max_length}
        settings.update(dtype=embed_info["dtype"], batch_size=batch_size)
        document = eval_document(location, facts, data, settings, embed_info, results, grid, saved)
        document["background"] = (
            None
            if background is None
            else {**background.summary(), "embedding": bg_info, "abtt": abtt, "whiten": whiten}
        )
        emit_json(document)
    else:
        from embfilter_cli.commands._eval_output import print_results

        print_results(results, grid, data, location.source, pooling, recipe)
