"""`embfilter eval`'s steps that print: the background texts, the saved best band, the result tables.

The tables show the results (best sweep row per centering) and the sweep heatmaps.
"""

from __future__ import annotations

import math
from typing import Any

from embfilter_cli.errors import UsageError


def load_background_noted(no_background: bool, spec: str | None, data_name: str, baselines_given: bool) -> Any:
    """The background texts (None without), reported on stderr; --abtt/--whiten without them is a usage error."""
    from embfilter_cli.console import info, warn
    from embfilter_cli.text.baselines import load_background
    from embfilter_cli.text.texts import describe_skipped

    if spec is not None and not no_background and spec.lower().endswith(".npy"):
        # eval embeds the background with each recipe it scores, so it needs the texts themselves.
        raise UsageError(
            f"--background {spec}: eval needs background TEXTS (it embeds them with the model and recipe it "
            "scores), not pre-computed embeddings; pass the texts, or centre a filter on the .npy with "
            "`embfilter center FILTER embeddings.npy`"
        )
    background = None if no_background else load_background(spec, data_name)
    if background is None and baselines_given:
        raise UsageError("--abtt and --whiten are fitted on background texts; add --background TEXTS")
    if background is not None:
        info(f"Background: {background.source}: {len(background.texts)} texts")
        if background.skipped:
            warn(f"--background: {describe_skipped(background.skipped)}")
    return background


def self_sample_embeddings(location: Any, cache: Any, embed_options: dict[str, Any]) -> Any:
    """`eval --center-self`: the model's own samples (default settings, cached), embedded like the data."""
    from embfilter_cli.console import info, notice, progress_bar
    from embfilter_cli.text.baselines import BackgroundTexts
    from embfilter_cli.text.cache import cached_embeddings
    from embfilter_cli.text.self_samples import SelfSampling, self_texts

    sampling = SelfSampling()
    with progress_bar("Sampling", sampling.count) as progress:
        drawn = self_texts(
            location,
            sampling,
            device=embed_options["device"],
            dtype=embed_options["dtype"],
            cache_dir=cache.root,
            use_cache=cache.enabled,
            progress=progress,
            notify=notice,
        )
    info(f"Self-generated texts: {len(drawn.texts)}" + (" (from the cache)" if drawn.cached else ""))
    if drawn.encoder is not None and embed_options.get("encoders") is not None:
        embed_options["encoders"].setdefault("encoder", drawn.encoder)  # one model load for sampling and embedding
    raw, _ = cached_embeddings(
        location, BackgroundTexts("self", drawn.texts), what="Self-generated embeddings", **embed_options
    )
    return raw


def save_best_band(
    results: Any, spectrum: Any, facts: Any, location: Any, data: Any, pooling: str, recipe: str, path: str, force: bool
) -> dict[str, Any]:
    """Write the best band as a filter artifact at `path`; its facts for the JSON document."""
    from embfilter_cli.console import info
    from embfilter_cli.filters.artifact import save_artifact
    from embfilter_cli.text.evaluation import best_band_artifact

    artifact, best_band = best_band_artifact(results, spectrum, facts, location, data, pooling, recipe)
    save_artifact(artifact, path, force=force)
    saved = {"path": path, **best_band.as_dict()}
    info(f"Saved the best band ({saved['name']}, Spearman {saved['spearman']:.4f}) to {path}")
    return saved


def print_results(results: list[Any], grid: Any, data: Any, source: str, pooling: str, recipe: str) -> None:
    """The results table (raw, filters, best sweep row per centering, bands, baselines), then the heatmaps."""
    from embfilter_cli.console import Column, DataTable, print_table

    raw = results[0].spearman
    table = DataTable(
        [
            Column("embedding"),
            Column("dims", justify="right"),
            Column("Spearman", justify="right"),
            Column("Δ raw", justify="right"),
            Column("Pearson", justify="right"),
        ],
        title=f"{data.name} ({len(data.pairs)} pairs) · {source} · {pooling} pooling · recipe {recipe}",
    )
    best_sweep = {
        c: max(
            (r for r in results if r.kind == "sweep" and r.centered == c and math.isfinite(r.spearman)),
            key=lambda r: r.spearman,
            default=None,
        )
        for c in (False, True)
    }
    for r in results:
        if r.kind == "sweep" and r is not best_sweep[r.centered]:
            continue
        name = {"sweep": "best of sweep: ", "baseline": "baseline: "}.get(r.kind, "") + r.name
        delta = "" if r.kind == "raw" else f"{r.spearman - raw:+.4f}"
        table.add_row(
            ("★ " if r.best else "  ") + name,
            str(r.output_dim),
            _fmt(r.spearman),
            delta,
            _fmt(r.pearson),
            style="bold" if r.best else None,
        )
    print_table(table)
    if grid is None:
        return
    _print_heatmap(grid.spearman, grid, raw, "")
    if grid.centered is not None:
        _print_heatmap(grid.centered.spearman, grid, raw, ", each band followed by centering on the background")


def _print_heatmap(values: Any, grid: Any, raw: float, what: str) -> None:
    from embfilter_cli.console import Cell, Column, DataTable, print_table, styled

    heat = DataTable(
        [Column("R \\ B", justify="right", style="bold"), *(Column(str(b), justify="right") for b in grid.bottom)],
        title=f"Spearman by band{what}: rows = top R removed, columns = bottom B removed (★ best; green beats raw)",
    )
    best_value = max((float(v) for v in values.ravel() if math.isfinite(float(v))), default=float("nan"))
    for i, top in enumerate(grid.top):
        cells: list[Cell] = []
        for j in range(len(grid.bottom)):
            value = float(values[i, j])
            if not math.isfinite(value):
                cells.append("—")
                continue
            style = "green" if value > raw + 1e-12 else ("red" if value < raw - 1e-12 else "")
            star = "★" if value == best_value else ""
            text = f"{star}{value:.3f}"
            cells.append(styled(text, style) if style else text)
        heat.add_row(str(top), *cells)
    print_table(heat)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"
