"""Measure what a filter gains: similarity datasets, rank metrics, band sweeps, an on-disk cache.

Data (`load_dataset`):
  - `lee`: the Lee et al. (2005) document-similarity set shipped inside the `gensim` wheel
    (`gensim/test/test_data/lee.cor`, 50 documents read as latin-1, and `similarities0-1.txt`,
    a 50×50 matrix of mean human ratings whose upper triangle gives 1225 pairs). The files are
    found through package metadata; gensim itself is never imported.
  - a TSV file of `text1<TAB>text2<TAB>score` rows (UTF-8). An optional first row whose third
    column reads `score` is a header; blank lines are skipped; anything else malformed is an error
    naming the line.
  Texts are deduplicated, so each distinct text is embedded once.

Metric: Spearman (average ranks for ties) and Pearson correlation between the cosine similarity
of each pair's embeddings and its human score, in float64.

Bands are evaluated on ONE set of raw embeddings: the raw vectors are rotated once into the
singular basis of W_U (coords = E·V), and a band that keeps directions [s, s+k) is then just the
column slice coords[:, s:s+k] (P has orthonormal rows, so cosines are unchanged by the rotation).
The model never runs per band.

Cache (`Cache`): raw embeddings and the exact spectrum of W_U are stored under
`$EMBFILTER_CACHE` (default `~/.cache/embfilter`), keyed by a cheap model fingerprint
(`embedding.model_fingerprint`), the recipe, pooling, max length, dtype and the data's SHA-256, so
a second sweep over the same model and data runs no model at all.

Not handled: pair classification metrics (accuracy/F1), retrieval metrics, MTEB tasks; datasets
other than Lee and TSV files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.errors import BandError, InputDataError, MissingDependencyError
from embfilter_cli.files import default_cache_dir

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.filters.band import Band
    from embfilter_cli.filters.spectral import Spectrum
    from embfilter_cli.model.location import ModelLocation

CACHE_VERSION = "1"
LEE_FILES = ("gensim/test/test_data/lee.cor", "gensim/test/test_data/similarities0-1.txt")
GENSIM_INSTALL = "pip install gensim"  # or `pip install 'embfilter[eval]'`


# --------------------------------------------------------------------------- datasets


@dataclass
class PairData:
    """Text pairs with human similarity scores; texts are unique and pairs index into them."""

    name: str
    texts: list[str]
    pairs: np.ndarray  # int64 (m, 2)
    scores: np.ndarray  # float64 (m,)

    @property
    def sha256(self) -> str:
        """Fingerprint of the exact texts, pairs and scores (the cache key's data part)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.texts, ensure_ascii=False).encode("utf-8"))
        digest.update(np.ascontiguousarray(self.pairs, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.scores, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Name, counts and SHA-256 of the data, for reports."""
        return {"name": self.name, "texts": len(self.texts), "pairs": len(self.pairs), "sha256": self.sha256}


def load_dataset(spec: str) -> PairData:
    """`lee` or a path to a TSV file (see module docstring)."""
    if spec == "lee":
        return load_lee()
    path = Path(spec)
    if not path.exists():
        raise InputDataError(
            f"--data {spec!r} is neither 'lee' nor an existing TSV file of text1<TAB>text2<TAB>score rows"
        )
    return load_tsv(path)


def _gensim_file(relative: str) -> Path:
    """Locate a file of the installed gensim wheel without importing gensim."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("gensim")
        path = Path(str(dist.locate_file(relative)))
    except PackageNotFoundError:
        import importlib.util

        spec = importlib.util.find_spec("gensim")  # top-level lookup only: does not import gensim
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(
                f"--data lee reads the Lee corpus shipped with gensim, which is not installed; run `{GENSIM_INSTALL}` "
                "(or pip install 'embfilter[eval]')"
            ) from None
        path = Path(next(iter(spec.submodule_search_locations))).parent / relative
    if not path.is_file():
        raise MissingDependencyError(
            f"gensim is installed but {relative} is missing from it; reinstall with `{GENSIM_INSTALL} --force-reinstall`"
        )
    return path


def load_lee() -> PairData:
    """The Lee document-similarity set: 50 documents, 1225 scored pairs."""
    corpus, ratings = (_gensim_file(f) for f in LEE_FILES)
    docs = [line.strip() for line in corpus.read_text(encoding="latin-1").splitlines() if line.strip()]
    matrix = np.loadtxt(ratings)
    n = len(docs)
    if matrix.shape != (n, n):
        raise InputDataError(f"{ratings} is {matrix.shape}, expected ({n}, {n}) for the {n} documents of {corpus}")
    rows, cols = np.triu_indices(n, 1)
    return PairData("lee", docs, np.stack([rows, cols], axis=1).astype(np.int64), matrix[rows, cols].astype(np.float64))


def load_tsv(path: Path) -> PairData:
    """`text1<TAB>text2<TAB>score` rows; errors name the offending line."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputDataError(f"{path} line {line_no} is not valid UTF-8; convert the file to UTF-8") from exc
    index: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    scores: list[float] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise InputDataError(
                f"{path} line {number} has {len(fields)} tab-separated field(s); expected text1<TAB>text2<TAB>score"
            )
        text1, text2, score_text = fields
        if number == 1 and score_text.strip().lower() == "score":
            continue  # header row
        try:
            score = float(score_text)
        except ValueError:
            raise InputDataError(f"{path} line {number}: score {score_text.strip()!r} is not a number") from None
        if not math.isfinite(score):
            raise InputDataError(f"{path} line {number}: score {score_text.strip()!r} is not finite")
        if not text1.strip() or not text2.strip():
            raise InputDataError(f"{path} line {number} has an empty text; every pair needs two non-empty texts")
        ids = tuple(index.setdefault(t, len(index)) for t in (text1, text2))
        pairs.append(ids)  # type: ignore[arg-type]
        scores.append(score)
    if len(pairs) < 3:
        raise InputDataError(f"{path} has {len(pairs)} scored pair(s); a correlation needs at least 3")
    if len(set(scores)) < 2:
        raise InputDataError(f"{path}: every score is {scores[0]}; a correlation needs scores that vary")
    return PairData(path.name, list(index), np.asarray(pairs, dtype=np.int64), np.asarray(scores, dtype=np.float64))


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
    kind: str  # "raw" | "filter" | "ratio" | "auto" | "sweep"
    output_dim: int
    spearman: float
    pearson: float
    band: dict[str, int] | None = None
    path: str | None = None
    best: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
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
    """Spearman for every (top, bottom) pair; NaN where the band is impossible."""

    top: list[int]
    bottom: list[int]
    spearman: np.ndarray  # (len(top), len(bottom))
    pearson: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """The grid as a JSON-ready dict (NaN cells become null)."""

        def rows(matrix: np.ndarray) -> list[list[float | None]]:
            return [[_finite_or_none(float(v)) for v in row] for row in matrix]

        return {"top": self.top, "bottom": self.bottom, "spearman": rows(self.spearman), "pearson": rows(self.pearson)}


class BandScorer:
    """Scores bands of one spectrum on one set of raw embeddings, without re-running the model."""

    def __init__(self, raw: np.ndarray, spectrum: Spectrum, data: PairData) -> None:
        if raw.shape[1] != spectrum.hidden_size:
            raise InputDataError(
                f"embeddings have dimension {raw.shape[1]} but W_U's spectrum has {spectrum.hidden_size}; "
                "the model and its unembedding do not match"
            )
        self.spectrum = spectrum
        self.data = data
        # One rotation into the singular basis; every band is then a column slice.
        self.coords = np.asarray(raw, dtype=np.float64) @ spectrum.vectors

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
) -> tuple[list[EvalResult], SweepGrid | None]:
    """Score the raw embedding, each filter, each paper ratio, the auto band and a (top × bottom) grid.

    Bands need `spectrum` (complete); filters are applied with `FilterArtifact.apply`. The best
    result by Spearman (raw included) is marked `best`.
    """
    from embfilter_cli.filters.band import band_from_rank, band_from_ratio

    d = raw.shape[1]
    results = [EvalResult("raw", "raw", d, *score_vectors(raw, data))]
    for art in filters:
        vectors = art.apply(np.asarray(raw, dtype=np.float64))
        results.append(
            EvalResult(
                Path(str(art.path)).name if art.path else "filter",
                "filter",
                art.output_dim,
                *score_vectors(vectors, data),
                band=art.band,
                path=str(art.path) if art.path else None,
            )
        )
    grid = None
    if spectrum is not None:
        scorer = BandScorer(raw, spectrum, data)
        for ratio in ratios:
            band = band_from_ratio(d, ratio)
            results.append(
                EvalResult(f"paper τ={ratio:g}", "ratio", band.keep, *scorer.score(band), band=band.as_dict())
            )
        if auto:
            from embfilter_cli.filters.band_auto import auto_band

            chosen = auto_band(spectrum.singular_values)
            results.append(
                EvalResult(
                    f"auto (top {chosen.band.top}, bottom {chosen.band.bottom})",
                    "auto",
                    chosen.band.keep,
                    *scorer.score(chosen.band),
                    band=chosen.band.as_dict(),
                )
            )
        if tops is not None and bottoms is not None:
            grid = scorer.grid(tops, bottoms)
            for i, top in enumerate(grid.top):
                for j, bottom in enumerate(grid.bottom):
                    if math.isfinite(grid.spearman[i, j]):
                        band = band_from_rank(d, top, bottom)
                        results.append(
                            EvalResult(
                                f"top {top}, bottom {bottom}",
                                "sweep",
                                band.keep,
                                float(grid.spearman[i, j]),
                                float(grid.pearson[i, j]),
                                band=band.as_dict(),
                            )
                        )
    finite = [r for r in results if math.isfinite(r.spearman)]
    if finite:
        max(finite, key=lambda r: r.spearman).best = True
    return results, grid


def best_band_result(results: Iterable[EvalResult]) -> EvalResult | None:
    """The highest-Spearman result that is a band of the spectrum (ratio, auto or sweep)."""
    bands = [r for r in results if r.kind in ("ratio", "auto", "sweep") and math.isfinite(r.spearman)]
    return max(bands, key=lambda r: r.spearman) if bands else None


def best_band_artifact(
    results: Iterable[EvalResult], spectrum: Any, facts: Any, location: Any, data: Any, pooling: str, recipe: str
) -> tuple[Any, EvalResult]:
    """A reduced filter artifact for the best band of `results`, recording how it was chosen.

    Args:
        spectrum: the head's spectrum the bands were cut from.
        facts: the head's facts from `head_spectrum` (tensor name, digest, sizes).
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


# --------------------------------------------------------------------------- cache


def cache_key(**parts: Any) -> str:
    """SHA-256 of the JSON of `parts` plus the cache format version."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Cache:
    """Raw embeddings and spectra on disk; a disabled cache stores and finds nothing.

    Files are written atomically; an unreadable entry counts as a miss and is overwritten.
    """

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def load_embeddings(self, key: str) -> np.ndarray | None:
        """Cached embeddings under `key`, or None (disabled, missing or unreadable)."""
        if not self.enabled:
            return None
        path = self._path("embeddings", key, ".npy")
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return array if array.ndim == 2 and array.dtype == np.float32 else None

    def save_embeddings(self, key: str, array: np.ndarray) -> None:
        """Store embeddings under `key` (atomically; no-op when disabled)."""
        if not self.enabled:
            return
        from embfilter_cli.files import atomic_path

        with atomic_path(self._path("embeddings", key, ".npy"), force=True) as tmp, tmp.open("wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.float32))

    def load_spectrum(self, key: str) -> tuple[Spectrum, dict[str, Any]] | None:
        """A cached (spectrum, head facts) under `key`, or None."""
        if not self.enabled:
            return None
        path = self._path("spectra", key, ".npz")
        if not path.is_file():
            return None
        from embfilter_cli.filters.spectral import Spectrum

        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                spectrum = Spectrum(
                    singular_values=np.array(npz["singular_values"], dtype=np.float64),
                    vectors=np.array(npz["vectors"], dtype=np.float64),
                    solver=meta["solver"],
                    params=meta["params"],
                    certificate=meta["certificate"],
                    frobenius_sq=float(meta["frobenius_sq"]),
                    seconds=0.0,
                )
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None
        return spectrum, meta["head"]

    def save_spectrum(self, key: str, spectrum: Spectrum, head: dict[str, Any]) -> None:
        """Store a spectrum and its head facts under `key` (atomically; no-op when disabled)."""
        if not self.enabled:
            return
        from embfilter_cli.files import atomic_path

        meta = {
            "solver": spectrum.solver,
            "params": spectrum.params,
            "certificate": spectrum.certificate,
            "frobenius_sq": spectrum.frobenius_sq,
            "head": head,
        }
        with atomic_path(self._path("spectra", key, ".npz"), force=True) as tmp, tmp.open("wb") as handle:
            np.savez(
                handle,
                singular_values=spectrum.singular_values,
                vectors=spectrum.vectors,
                meta=np.array(json.dumps(meta, default=_json_safe)),
            )

    def load_json(self, kind: str, key: str) -> dict[str, Any] | None:
        """A cached JSON object of `kind` under `key`, or None."""
        if not self.enabled:
            return None
        path = self._path(kind, key, ".json")
        with contextlib.suppress(OSError, ValueError):
            value = json.loads(path.read_text())
            return value if isinstance(value, dict) else None
        return None

    def save_json(self, kind: str, key: str, value: dict[str, Any]) -> None:
        """Store a JSON object of `kind` under `key` (atomically; no-op when disabled)."""
        if not self.enabled:
            return
        from embfilter_cli.files import atomic_path

        with atomic_path(self._path(kind, key, ".json"), force=True) as tmp:
            tmp.write_text(json.dumps(value, default=_json_safe))


def _json_safe(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------- the model's head, cached


@dataclass
class HeadFacts:
    """What an artifact records about W_U (enough to check and to build filters)."""

    sha256: str
    tensor_name: str
    vocab_size: int
    stored_rows: int
    hidden_size: int

    def as_dict(self) -> dict[str, Any]:
        """The facts as a JSON-ready dict."""
        return {
            "sha256": self.sha256,
            "tensor_name": self.tensor_name,
            "vocab_size": self.vocab_size,
            "stored_rows": self.stored_rows,
            "hidden_size": self.hidden_size,
        }


def head_spectrum(
    location: ModelLocation, cache: Cache, device: str = "auto", need_spectrum: bool = True
) -> tuple[HeadFacts, Spectrum | None, bool]:
    """W_U's fingerprint and (optionally) its exact spectrum, from the cache when possible.

    Uses the same defaults as `embfilter fit` (default tensor choice, padding rows dropped), so a
    band saved from here equals `fit`'s filter for that band. Returns (facts, spectrum, from_cache).
    """
    from embfilter_cli.text.embedding import model_fingerprint

    key = cache_key(model=model_fingerprint(location), what="head")
    if need_spectrum:
        hit = cache.load_spectrum(key)
        if hit is not None:
            spectrum, head = hit
            return HeadFacts(**head), spectrum, True
    else:
        cached = cache.load_json("heads", key)
        if cached is not None:
            with contextlib.suppress(TypeError):
                return HeadFacts(**cached), None, True
    from embfilter_cli.model.unembedding import read_unembedding

    unemb = read_unembedding(location)
    facts = HeadFacts(unemb.sha256, unemb.tensor_name, unemb.vocab_size, unemb.stored_rows, unemb.hidden_size)
    cache.save_json("heads", key, facts.as_dict())
    if not need_spectrum:
        return facts, None, False
    from embfilter_cli.filters.spectral import exact_spectrum, resolve_device

    spectrum = exact_spectrum(unemb.matrix, device=resolve_device(device))
    cache.save_spectrum(key, spectrum, facts.as_dict())
    return facts, spectrum, False
