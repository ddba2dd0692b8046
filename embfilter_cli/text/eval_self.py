"""`embfilter eval --center-self`: score each filter and band centred on the model's own samples.

The rows sit next to the uncentred ones and the `--background` rows: the same filter or band,
followed by subtracting the mean of the filtered self-generated vectors (`text.self_samples`),
which is what `embfilter fit --center-on self` stores for the same pooling/recipe. This module
makes the centred vectors; `text.evaluation.evaluate_all` scores them as rows of kind "filter",
"ratio" or "auto" with `"centring": "self"` in their JSON (`centered` stays False: that flag means
the `--background` mean).

Not handled: sweep grids centred on the samples (one mean per band would be a second heatmap).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.filters.spectral import Spectrum

SUFFIX = " + self-centring"
Row = tuple[str, str, np.ndarray, "dict[str, int] | None", "str | None"]  # name, kind, vectors, band, path


def self_centred_vectors(
    raw: np.ndarray,
    samples: np.ndarray,
    *,
    spectrum: Spectrum | None,
    filters: Sequence[FilterArtifact] = (),
    ratios: Sequence[float] = (),
    auto: bool = True,
) -> list[Row]:
    """Each filter, paper ratio and the auto band applied to `raw`, centred on the mean of the filtered `samples`.

    Args:
        raw: (n, d) raw embeddings of the data's texts.
        samples: (m, d) raw embeddings of the self-generated texts, same pooling/recipe.
        spectrum: W_U's complete spectrum (bands need it; None: filters only).

    Returns:
        (row name, kind, (n, k) float64 vectors, band dict, filter path) per row.
    """
    from embfilter_cli.filters.band import band_from_ratio

    x = np.asarray(raw, dtype=np.float64)
    mu = np.asarray(samples, dtype=np.float64).mean(axis=0)
    out: list[Row] = []
    for art in filters:
        # A filter centred on something else is re-centred here: the row asks what the samples' mean gives.
        p = art.projection.astype(np.float64)
        name = Path(str(art.path)).name if art.path else "filter"
        out.append((name + SUFFIX, "filter", x @ p.T - p @ mu, art.band, str(art.path) if art.path else None))
    if spectrum is None:
        return out
    named = [(f"paper τ={ratio:g}", "ratio", band_from_ratio(spectrum.hidden_size, ratio)) for ratio in ratios]
    if auto:
        from embfilter_cli.filters.band_auto import auto_band

        chosen = auto_band(spectrum.singular_values).band
        named.append((f"auto (top {chosen.top}, bottom {chosen.bottom})", "auto", chosen))
    coords = (x - mu) @ spectrum.vectors  # P is linear: centring before the rotation is centring after it
    out.extend(
        (label + SUFFIX, kind, coords[:, band.start : band.stop], band.as_dict(), None) for label, kind, band in named
    )
    return out


__all__ = ["SUFFIX", "self_centred_vectors"]
