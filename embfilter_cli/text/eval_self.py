"""`embfilter eval --center-self`: score each filter and band centred on the model's own samples.

The rows sit next to the uncentred ones and the `--background` rows: the same filter or band,
followed by subtracting the mean of the filtered self-generated vectors (`text.self_samples`),
which is what `embfilter fit --center-on self` stores for the same pooling/recipe. Rows are kind
"filter", "ratio" or "auto" with `"centring": "self"` in their JSON (`centered` stays False: that
flag means the `--background` mean).

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
    from embfilter_cli.text.datasets import PairData
    from embfilter_cli.text.evaluation import EvalResult

SUFFIX = " + self-centring"


def self_centred_results(
    raw: np.ndarray,
    data: PairData,
    samples: np.ndarray,
    *,
    spectrum: Spectrum | None,
    filters: Sequence[FilterArtifact] = (),
    ratios: Sequence[float] = (),
    auto: bool = True,
) -> list[EvalResult]:
    """Each filter, paper ratio and the auto band, centred on the mean of the filtered `samples`.

    Args:
        raw: (n, d) raw embeddings of the data's texts.
        data: the scored pairs.
        samples: (m, d) raw embeddings of the self-generated texts, same pooling/recipe.
        spectrum: W_U's complete spectrum (bands need it; None: filters only).
    """
    from embfilter_cli.filters.band import band_from_ratio
    from embfilter_cli.text.evaluation import EvalResult, score_vectors

    x = np.asarray(raw, dtype=np.float64)
    mu = np.asarray(samples, dtype=np.float64).mean(axis=0)
    facts = {"centring": "self", "self_samples": int(samples.shape[0])}
    out: list[EvalResult] = []
    for art in filters:
        # A filter centred on something else is re-centred here: the row asks what the samples' mean gives.
        projected = x @ art.projection.astype(np.float64).T
        vectors = projected - art.projection.astype(np.float64) @ mu
        name = Path(str(art.path)).name if art.path else "filter"
        scores = score_vectors(vectors, data)
        out.append(EvalResult(name + SUFFIX, "filter", art.output_dim, *scores, band=art.band, path=str(art.path), extra=dict(facts)))  # fmt: skip
    if spectrum is None:
        return out
    named = [(f"paper τ={ratio:g}", "ratio", band_from_ratio(spectrum.hidden_size, ratio)) for ratio in ratios]
    if auto:
        from embfilter_cli.filters.band_auto import auto_band

        chosen = auto_band(spectrum.singular_values).band
        named.append((f"auto (top {chosen.top}, bottom {chosen.bottom})", "auto", chosen))
    coords = (x - mu) @ spectrum.vectors  # P is linear: centring before the rotation is centring after it
    for label, kind, band in named:
        scores = score_vectors(coords[:, band.start : band.stop], data)
        out.append(EvalResult(label + SUFFIX, kind, band.keep, *scores, band=band.as_dict(), extra=dict(facts)))
    return out


__all__ = ["SUFFIX", "self_centred_results"]
