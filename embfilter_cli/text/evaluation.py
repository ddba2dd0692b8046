"""Measure what a filter gains: rank metrics and band sweeps on one set of raw embeddings.

The data (text pairs with human scores) comes from `text/datasets.py`; the raw embeddings and
W_U's spectrum from `text/cache.py`; the heatmap of a sweep is drawn by `text/plots.py`.

Metric: Spearman (average ranks for ties) and Pearson correlation between the cosine similarity
of each pair's embeddings and its human score, in float64.

Bands are evaluated on ONE set of raw embeddings: the raw vectors are rotated once into the
singular basis of W_U (coords = E·V), and a band that keeps directions [s, s+k) is then just the
column slice coords[:, s:s+k] (P has orthonormal rows, so cosines are unchanged by the rotation).
The model never runs per band.

Not handled: pair classification metrics (accuracy/F1), retrieval metrics, MTEB tasks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.errors import BandError, InputDataError

JSON_SCHEMA = "embfilter.eval/1"

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.filters.band import Band
    from embfilter_cli.filters.spectral import Spectrum
    from embfilter_cli.model.head import HeadFacts
    from embfilter_cli.model.location import ModelLocation
    from embfilter_cli.text.cache import Cache
    from embfilter_cli.text.datasets import PairData


# --------------------------------------------------------------------------- metrics


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's 'average' method)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values; each run gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation in float64; NaN when either input is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(x), rankdata(y))


def pair_cosines(vectors: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair's vectors (float64; a zero vector gives cosine 0)."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1)
    norms[norms == 0] = 1.0
    unit = v / norms[:, None]
    return np.einsum("ij,ij->i", unit[pairs[:, 0]], unit[pairs[:, 1]])


def score_vectors(vectors: np.ndarray, data: PairData) -> tuple[float, float]:
    """(Spearman, Pearson) of pair cosines against the human scores."""
    cos = pair_cosines(vectors, data.pairs)
    return spearman(cos, data.scores), pearson(cos, data.scores)


# --------------------------------------------------------------------------- bands and sweeps


@dataclass
class EvalResult:
    """One evaluated embedding variant."""

    name: str
    kind: str  # "raw" | "filter" | "ratio" | "auto" | "sweep" | "baseline"
    output_dim: int
    spearman: float
    pearson: float
    band: dict[str, int] | None = None
    path: str | None = None
    best: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    centered: bool = False  # then minus the background mean of the same (filtered) vectors

    def as_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "centered": self.centered,
            "band": self.band,
            "path": self.path,
            "output_dim": self.output_dim,
            "spearman": _finite_or_none(self.spearman),
            "pearson": _finite_or_none(self.pearson),
            "best": self.best,
        }
        out.update(self.extra)
        return out


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def parse_int_list(text: str, option: str) -> list[int]:
    """'0,4,16' → [0, 4, 16] (unique, in order); errors name the option."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise BandError(f"{option} {text!r}: {part!r} is not a whole number; give a list like 0,4,16") from None
        if value < 0:
            raise BandError(f"{option} {text!r}: {value} is negative; directions to remove must be >= 0")
        if value not in values:
            values.append(value)
    if not values:
        raise BandError(f"{option} {text!r} lists no values; give a list like 0,4,16")
    return values


def parse_float_list(text: str, option: str) -> list[float]:
    """'1,2,8' → [1.0, 2.0, 8.0]; every ratio must be >= 1."""
    values: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise BandError(f"{option} {text!r}: {part!r} is not a number; give a list like 1,2,8") from None
        if not math.isfinite(value) or value < 1:
            raise BandError(f"{option} {text!r}: {part} must be a number >= 1 (1 keeps everything)")
        if value not in values:
            values.append(value)
    if not values:
        raise BandError(f"{option} {text!r} lists no values; give a list like 1,2,8")
    return values


@dataclass
class SweepGrid:
    """Spearman for every (top, bottom) pair; NaN where the band is impossible (`centered`: same, centred)."""

    top: list[int]
    bottom: list[int]
    spearman: np.ndarray  # (len(top), len(bottom))
    pearson: np.ndarray
    centered: SweepGrid | None = None

    def as_dict(self) -> dict[str, Any]:
        """The grid as a JSON-ready dict (NaN cells become null)."""

        def rows(matrix: np.ndarray) -> list[list[float | None]]:
            return [[_finite_or_none(float(v)) for v in row] for row in matrix]

        out = {"top": self.top, "bottom": self.bottom, "spearman": rows(self.spearman), "pearson": rows(self.pearson)}
        if self.centered is not None:
            out["centered"] = {"spearman": rows(self.centered.spearman), "pearson": rows(self.centered.pearson)}
        return out


class BandScorer:
    """Scores bands of one spectrum on one set of raw embeddings, without re-running the model."""

    def __init__(self, raw: np.ndarray, spectrum: Spectrum, data: PairData, center: np.ndarray | None = None) -> None:
        if raw.shape[1] != spectrum.hidden_size:
            raise InputDataError(
                f"embeddings have dimension {raw.shape[1]} but W_U's spectrum has {spectrum.hidden_size}; "
                "the model and its unembedding do not match"
            )
        self.spectrum = spectrum
        self.data = data
        # One rotation into the singular basis; every band is then a column slice.
        # With `center` (the raw background mean) each band is followed by centering: P is linear, so
        # the filtered background mean is the band's slice of the rotated raw mean.
        shift = 0.0 if center is None else np.asarray(center, dtype=np.float64)
        self.coords = (np.asarray(raw, dtype=np.float64) - shift) @ spectrum.vectors

    def score(self, band: Band) -> tuple[float, float]:
        """(Spearman, Pearson) of the pair cosines after filtering with `band`."""
        if band.stop > self.coords.shape[1]:
            raise BandError(
                f"band {band.label()} needs {band.stop} directions; the spectrum has {self.coords.shape[1]}"
            )
        return score_vectors(self.coords[:, band.start : band.stop], self.data)

    def grid(self, tops: Sequence[int], bottoms: Sequence[int]) -> SweepGrid:
        """Score every (top, bottom) combination; impossible bands stay NaN."""
        from embfilter_cli.filters.band import Band

        d = self.spectrum.hidden_size
        sp = np.full((len(tops), len(bottoms)), np.nan)
        pe = np.full((len(tops), len(bottoms)), np.nan)
        for i, top in enumerate(tops):
            for j, bottom in enumerate(bottoms):
                if top + bottom < d:
                    sp[i, j], pe[i, j] = self.score(Band(d, top, d - top - bottom))
        return SweepGrid(list(tops), list(bottoms), sp, pe)


def evaluate_all(
    raw: np.ndarray,
    data: PairData,
    *,
    spectrum: Spectrum | None = None,
    filters: Sequence[FilterArtifact] = (),
    ratios: Sequence[float] = (),
    tops: Sequence[int] | None = None,
    bottoms: Sequence[int] | None = None,
    auto: bool = True,
    background: np.ndarray | None = None,
    baselines: dict[str, Any] | None = None,
    self_samples: np.ndarray | None = None,
) -> tuple[list[EvalResult], SweepGrid | None]:
    """Score the raw embedding, each filter, each paper ratio, the auto band and a (top × bottom) grid.

    Bands need `spectrum` (complete); filters are applied with `FilterArtifact.apply`. With
    `background` (raw embeddings of unlabeled texts) every filter and band is scored again followed
    by centering on the background mean of the same filtered vectors (`centered` rows), and the
    baselines of `text.baselines.baseline_results` are added (keyword arguments in `baselines`; PCA
    to each filter's, the auto band's and each whitening dimension). The best result by Spearman,
    over ALL rows, is marked `best`. With `self_samples` (raw embeddings of the model's own texts)
    each filter, ratio and the auto band is also scored centred on their mean (`text.eval_self`).
    """
    from embfilter_cli.filters.band import band_from_rank, band_from_ratio

    d = raw.shape[1]
    x = np.asarray(raw, dtype=np.float64)
    if background is not None and (background.ndim != 2 or background.shape[1] != d):
        raise InputDataError(
            f"the background embeddings have shape {background.shape} but the data's have dimension {d}; "
            "embed both with the same model"
        )
    centerings = [False] if background is None else [False, True]
    bg = None if background is None else np.asarray(background, dtype=np.float64)
    results = [EvalResult("raw", "raw", d, *score_vectors(raw, data))]
    for art in filters:
        name, path = (Path(str(art.path)).name, str(art.path)) if art.path else ("filter", None)
        for c in centerings:
            vectors = art.apply(x) - (art.apply(bg).mean(axis=0) if c else 0.0)  # type: ignore[arg-type]
            label = name + (" + centering" if c else "")
            results.append(EvalResult(label, "filter", art.output_dim, *score_vectors(vectors, data), band=art.band, path=path, centered=c))  # fmt: skip
    grid = None
    auto_dim = None
    if spectrum is not None:
        scorers = {c: BandScorer(raw, spectrum, data, center=bg.mean(axis=0) if c else None) for c in centerings}  # type: ignore[union-attr]
        suffix = {False: "", True: " + centering"}
        named = [(f"paper τ={ratio:g}", "ratio", band_from_ratio(d, ratio)) for ratio in ratios]
        if auto:
            from embfilter_cli.filters.band_auto import auto_band

            chosen = auto_band(spectrum.singular_values).band
            auto_dim = chosen.keep
            named.append((f"auto (top {chosen.top}, bottom {chosen.bottom})", "auto", chosen))
        for label, kind, band in named:
            for c in centerings:
                results.append(EvalResult(label + suffix[c], kind, band.keep, *scorers[c].score(band), band=band.as_dict(), centered=c))  # fmt: skip
        if tops is not None and bottoms is not None:
            grids = {c: scorers[c].grid(tops, bottoms) for c in centerings}
            grid = grids[False]
            grid.centered = grids.get(True)
            for c, g in grids.items():
                for i, top in enumerate(g.top):
                    for j, bottom in enumerate(g.bottom):
                        if math.isfinite(g.spearman[i, j]):
                            band = band_from_rank(d, top, bottom)
                            results.append(EvalResult(f"top {top}, bottom {bottom}{suffix[c]}", "sweep", band.keep, float(g.spearman[i, j]), float(g.pearson[i, j]), band=band.as_dict(), centered=c))  # fmt: skip
    if self_samples is not None:
        from embfilter_cli.text.eval_self import self_centred_vectors

        facts = {"centring": "self", "self_samples": int(self_samples.shape[0])}
        for name, kind, v, band_dict, path in self_centred_vectors(raw, self_samples, spectrum=spectrum, filters=filters, ratios=ratios, auto=auto):  # fmt: skip
            results.append(EvalResult(name, kind, v.shape[1], *score_vectors(v, data), band=band_dict, path=path, extra=dict(facts)))  # fmt: skip
    if bg is not None:
        from embfilter_cli.text.baselines import DEFAULT_WHITEN

        options = dict(baselines or {})
        whiten = list(options.get("whiten", DEFAULT_WHITEN))
        dims = [art.output_dim for art in filters] + ([auto_dim] if auto_dim else []) + whiten
        options.setdefault("pca", dims)
        results.extend(baseline_results(x, bg, data, **options))
    finite = [r for r in results if math.isfinite(r.spearman)]
    if finite:
        max(finite, key=lambda r: r.spearman).best = True
    return results, grid


def baseline_results(raw: np.ndarray, background: np.ndarray, data: PairData, **options: Any) -> list[EvalResult]:
    """`text.baselines.baseline_vectors` (same options), scored: kind "baseline", method and k in the JSON."""
    from embfilter_cli.text.baselines import baseline_vectors

    rows = baseline_vectors(np.asarray(raw, dtype=np.float64), np.asarray(background, dtype=np.float64), **options)
    return [EvalResult(name, "baseline", v.shape[1], *score_vectors(v, data), extra=facts) for name, facts, v in rows]


def best_band_result(results: Iterable[EvalResult]) -> EvalResult | None:
    """The highest-Spearman uncentred band of the spectrum (ratio, auto or sweep): what an artifact holds."""
    bands = [
        r for r in results if r.kind in ("ratio", "auto", "sweep") and not r.centered and math.isfinite(r.spearman)
    ]
    return max(bands, key=lambda r: r.spearman) if bands else None


def best_band_artifact(
    results: Iterable[EvalResult],
    spectrum: Spectrum,
    facts: HeadFacts,
    location: ModelLocation,
    data: PairData,
    pooling: str,
    recipe: str,
) -> tuple[FilterArtifact, EvalResult]:
    """A reduced filter artifact for the best band of `results`, recording how it was chosen.

    Args:
        spectrum: the head's spectrum the bands were cut from.
        facts: the head's facts (`model.head.HeadFacts`: tensor name, digest, sizes).
        location: the resolved model.
        data: the dataset the bands were scored on.
    """
    from embfilter_cli.filters.band import Band
    from embfilter_cli.filters.fitting import build_artifact

    best = best_band_result(results)
    assert best is not None and best.band is not None  # the caller evaluated at least one band
    band = Band(best.band["hidden_size"], best.band["start"], best.band["keep"])
    selected = {
        "data": data.name,
        "data_sha256": data.sha256,
        "pooling": pooling,
        "recipe": recipe,
        "spearman": best.spearman,
        "pearson": best.pearson,
        "candidate": best.name,
    }
    artifact = build_artifact(
        spectrum,
        band,
        reduce=True,
        model_source=location.source,
        model_revision=location.revision,
        tensor_name=facts.tensor_name,
        unembedding_sha256=facts.sha256,
        vocab_size=facts.vocab_size,
        stored_rows=facts.stored_rows,
        extra={"selected_by_eval": json.dumps(selected)},
    )
    return artifact, best


def head_for_eval(
    location: ModelLocation,
    cache: Cache,
    device: str,
    need_spectrum: bool,
    filters: Sequence[FilterArtifact],
    log: Callable[[str], None],
) -> tuple[HeadFacts | None, Spectrum | None]:
    """W_U's facts (and its exact spectrum when bands are evaluated), with every filter checked against it.

    None, None when neither bands nor filters are evaluated (the head is then never read).
    """
    if not (need_spectrum or filters):
        return None, None
    import time

    from embfilter_cli.model.head import check_filter_matches
    from embfilter_cli.text.cache import cached_head_spectrum

    started = time.perf_counter()
    facts, spectrum, hit = cached_head_spectrum(location, cache, device=device, need_spectrum=need_spectrum)
    done = (
        "from cache"
        if hit
        else f"read{' and decomposed' if need_spectrum else ''} in {time.perf_counter() - started:.1f}s"
    )
    log(f"W_U {facts.tensor_name} {facts.vocab_size}×{facts.hidden_size}: {done}")
    for art in filters:
        check_filter_matches(
            art, hidden_size=facts.hidden_size, unembedding_sha256=facts.sha256, model_source=location.source
        )
    return facts, spectrum


def eval_document(
    location: ModelLocation,
    facts: HeadFacts | None,
    data: PairData,
    settings: dict[str, Any],
    embedding: dict[str, Any],
    results: Sequence[EvalResult],
    grid: SweepGrid | None,
    saved: dict[str, Any] | None,
) -> dict[str, Any]:
    """The `embfilter eval --json` document (schema `embfilter.eval/1`); sweep rows are in `grid` only."""
    best = next((r for r in results if r.best), None)
    return {
        "schema": JSON_SCHEMA,
        "model": {
            "source": location.source,
            "revision": location.revision,
            "unembedding_sha256": facts.sha256 if facts else None,
        },
        "data": data.summary(),
        "settings": settings,
        "embedding": embedding,
        "results": [r.as_dict() for r in results if r.kind != "sweep"],
        "grid": grid.as_dict() if grid is not None else None,
        "best": best.as_dict() if best else None,
        "saved_best": saved,
    }
