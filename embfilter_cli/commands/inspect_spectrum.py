"""`embfilter inspect spectrum`: W_U's singular values with the band marked (sparkline, optional plot)."""

from __future__ import annotations

from typing import Any

import click

from embfilter_cli.commands._inspect_common import (
    band_for,
    band_options,
    band_text,
    check_band_conflict,
    echo_table,
    filter_option,
    load_target,
    model_options,
)
from embfilter_cli.commands._options import force_option, output_options


@click.command()
@model_options
@filter_option
@band_options
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

    check_band_conflict(filter_ is not None, rank, bottom, ratio, start, keep)
    if plot is not None:
        from embfilter_cli.files import check_writable

        fmt = plot.rsplit(".", 1)[-1].lower() if "." in plot else ""
        if fmt not in ("png", "svg", "pdf"):
            raise click.BadParameter(f"{plot!r} must end in .png, .svg or .pdf", param_hint="--plot")
        check_writable(plot, force)  # before any decomposition
        from embfilter_cli.text.plots import require_matplotlib

        require_matplotlib()
    if filter_ is not None and model is None:
        ctx = load_target(None, revision, filter_, need_matrix=False)
        art = ctx.artifact
        assert art is not None  # filter_ was given
        sigma = np.asarray(art.singular_values, dtype=np.float64)
        d = art.hidden_size
        sha = art.unembedding_sha256
        source = art.model_source
    else:
        from embfilter_cli.filters.solve import exact_spectrum_of

        ctx = load_target(model, revision, filter_)
        art = ctx.artifact
        d = ctx.unemb.hidden_size
        sha = ctx.unemb.sha256
        source = ctx.location.source
        if art is not None and len(art.singular_values) == d:
            sigma = np.asarray(art.singular_values, dtype=np.float64)
        else:
            sigma = exact_spectrum_of(ctx.unemb.matrix, log=info).singular_values
    band, band_source = band_for(d, art, rank, bottom, ratio, start, keep)
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
    out_text(f"band ({origin}): {band_text(doc['band'])}")
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
    echo_table(rows, right={1, 2})
