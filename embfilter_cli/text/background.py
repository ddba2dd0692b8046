"""Background sets for centring a filter: read texts (or pre-computed embeddings), embed, take the mean.

`read_background` accepts what `embfilter embed` reads (plain lines, JSONL with a `text` field,
or `-` for stdin) or a `.npy` file of raw (n, d) embeddings made elsewhere, or `self`: texts the model samples itself
(`text.self_samples`; drawn by `sample_background` once the model is known); `centre_filter` turns
either into a centred copy of a filter (`FilterArtifact.with_mean`) whose `centering` record says
how the mean was made. `embfilter fit --center-on` and `embfilter center` both call these.

For a `.npy` background the vectors are used as they are (no model run): the pooling, recipe and
max_length recorded with the mean are the ones the caller DECLARES for them (`source` =
"embeddings" in the record), and their SHA-256 is that of the .npy file's bytes.

Not handled: Parquet input, weighting texts, sampling a large background (every row is averaged;
the mean is accumulated in float64 chunks, so memory stays bounded for memory-mapped .npy files).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from embfilter_cli.errors import InputDataError
from embfilter_cli.filters.centering import Centering, filtered_mean, texts_sha256
from embfilter_cli.text.recipes import check_pooling, resolve_recipe
from embfilter_cli.text.texts import read_texts

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.model.location import ModelLocation
    from embfilter_cli.text.embedding import Encoder
    from embfilter_cli.text.self_samples import SelfSampling

EMBEDDING_SUFFIXES = (".npy",)
SELF = "self"  # `--center-on self`: the model's own samples (a file named self: pass ./self)


@dataclass
class Background:
    """The background set: texts to embed, or raw embeddings (exactly one of the two), or texts still
    to be sampled (`sampling` set, `texts` None: see `sample_background`)."""

    input: str  # the path given, "-", or "self"
    texts: list[str] | None = None
    embeddings: np.ndarray | None = None  # (n, d) raw vectors from a .npy (memory-mapped)
    sha256: str = ""  # of the texts (`texts_sha256`) or of the .npy file's bytes
    skipped: list[int] = field(default_factory=list)  # 1-based line numbers of blank texts
    sampling: SelfSampling | None = None  # for "self": how the texts are (or were) sampled
    sampled: dict[str, Any] | None = None  # for "self", once sampled: `SelfTexts.record`

    @property
    def pending(self) -> bool:
        """Texts the model has yet to sample."""
        return self.sampling is not None and self.texts is None

    @property
    def count(self) -> int:
        """Number of background texts or embeddings (for pending samples: how many will be drawn)."""
        if self.texts is not None:
            return len(self.texts)
        if self.embeddings is not None:
            return int(self.embeddings.shape[0])
        return self.sampling.count if self.sampling is not None else 0

    @property
    def dim(self) -> int | None:
        """The embeddings' dimension (None for texts: known only after embedding)."""
        return None if self.embeddings is None else int(self.embeddings.shape[1])


def read_background(
    source: str, input_format: str = "auto", stdin: TextIO | None = None, sampling: SelfSampling | None = None
) -> Background:
    """Read a background: a `.npy` of (n, d) float embeddings, texts as `read_texts` reads them, or "self".

    For "self" nothing is read: the result is pending until `sample_background` draws the texts
    with `sampling` (default `SelfSampling()`).

    Raises:
        InputDataError: a missing file, no non-empty text (empty or all-blank input), a .npy that
            is not a non-empty 2-D float array, bad sampling settings.
    """
    if source == SELF:
        from embfilter_cli.text.self_samples import SelfSampling

        return Background(SELF, sampling=(sampling or SelfSampling()).checked())
    if source != "-" and Path(source).suffix.lower() in EMBEDDING_SUFFIXES:
        return _read_embeddings(Path(source))
    texts_in = read_texts(source, input_format, stdin=stdin)
    return Background(source, texts=texts_in.texts, sha256=texts_sha256(texts_in.texts), skipped=texts_in.skipped)


def _read_embeddings(path: Path) -> Background:
    if not path.is_file():
        raise InputDataError(f"background file {path} does not exist; give a .npy of (n, d) embeddings, or texts")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise InputDataError(f"{path} is not a readable .npy array ({exc}); save embeddings with numpy.save") from exc
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise InputDataError(
            f"{path} holds a {array.dtype} array of shape {tuple(array.shape)}; centring needs a 2-D (n, d) "
            "float array of raw embeddings"
        )
    if array.shape[0] == 0:
        raise InputDataError(f"{path} holds no vectors (shape {tuple(array.shape)}); centring needs at least one")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return Background(str(path), embeddings=array, sha256=digest.hexdigest())


def check_background_dim(background: Background, hidden_size: int, filter_name: str) -> None:
    """Fail before any expensive work when pre-computed embeddings cannot fit the filter."""
    if background.dim is not None and background.dim != hidden_size:
        raise InputDataError(
            f"{background.input} holds {background.dim}-dimensional embeddings but {filter_name} expects "
            f"{hidden_size}; give embeddings made by the filter's model (hidden size {hidden_size}), or texts"
        )


def sample_background(
    background: Background,
    location: ModelLocation,
    *,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> tuple[Background, Encoder | None]:
    """Draw a pending "self" background's texts (`text.self_samples.self_texts`, cached); others pass through.

    Returns the background with its texts, SHA-256 and sampling record, and the encoder that
    sampled them (None when they came from the cache or nothing was sampled), to embed with.
    """
    if not background.pending:
        return background, None
    from embfilter_cli.text.self_samples import self_texts

    drawn = self_texts(location, background.sampling, device=device, dtype=dtype, progress=progress, notify=notify)
    sampled = Background(
        background.input, texts=drawn.texts, sha256=drawn.sha256, sampling=background.sampling, sampled=drawn.record
    )
    return sampled, drawn.encoder


@dataclass
class CentreReport:
    """What centring did, for the command's summary."""

    count: int
    source: str
    truncated: int
    seconds: float
    mean_norm: float

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "count": self.count,
            "source": self.source,
            "truncated": self.truncated,
            "seconds": round(self.seconds, 3),
            "mean_norm": self.mean_norm,
        }


def centre_filter(
    artifact: FilterArtifact,
    background: Background,
    *,
    location: ModelLocation | None,
    pooling: str = "mean",
    recipe: str = "none",
    max_length: int = 512,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    on_loaded: Callable[[Any], None] | None = None,
    encoder: Encoder | None = None,
) -> tuple[FilterArtifact, CentreReport]:
    """A copy of `artifact` centred on the mean of the filtered `background` vectors (not saved).

    Args:
        artifact: the filter (its projection P is kept as is).
        background: from `read_background`.
        location: the model that embeds texts (the filter's own model; the caller checks its
            fingerprint); unused, and may be None, for pre-computed embeddings.
        pooling, recipe, max_length, batch_size, device, dtype: as `embfilter embed` takes them.
        progress: a `(texts done, texts total)` callback, as `Encoder.embed` takes it.
        on_loaded: called with the loaded encoder (for a log line), before embedding.
        encoder: an encoder already loaded from `location` (the one that sampled a "self"
            background), used instead of loading the model again.
    """
    check_pooling(pooling)
    rec = resolve_recipe(recipe)
    name = str(artifact.path or "the filter")
    check_background_dim(background, artifact.hidden_size, name)
    start = time.perf_counter()
    truncated = 0
    if background.pending:
        if location is None:
            raise ValueError("self-sampling needs a model location")  # a bug in the caller
        background, sampled_with = sample_background(background, location, device=device, dtype=dtype)
        encoder = encoder or sampled_with
    if background.embeddings is not None:
        raw = background.embeddings
        source = "embeddings"
        limit = max_length
        model_source = artifact.model_source
    else:
        from embfilter_cli.text.embedding import load_encoder_at

        if location is None:
            raise ValueError("texts need a model location")  # a bug in the caller
        if encoder is None:
            encoder = load_encoder_at(location, device=device, dtype=dtype)
        if on_loaded is not None:
            on_loaded(encoder)
        if encoder.hidden_size != artifact.hidden_size:
            raise InputDataError(
                f"{location.source} makes {encoder.hidden_size}-dimensional embeddings but {name} expects "
                f"{artifact.hidden_size}; centre with the model the filter was fitted on"
            )
        limit = encoder.effective_max_length(max_length)
        raw = encoder.embed(
            background.texts or [],
            pooling=pooling,
            recipe=recipe,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
        )
        truncated = encoder.last_truncated
        source = "texts"
        model_source = location.source
    mean = filtered_mean(raw, artifact.projection, where=background.input)
    centering = Centering(
        count=background.count,
        source=source,
        sha256=background.sha256,
        pooling=pooling,
        recipe=rec.name,
        template=rec.template,
        max_length=int(limit),
        model_source=model_source,
        unembedding_sha256=artifact.unembedding_sha256,
        input=background.input,
        sampling=background.sampled,
    )
    centred = artifact.with_mean(mean.astype(np.float32), centering)
    report = CentreReport(
        count=background.count,
        source=source,
        truncated=truncated,
        seconds=time.perf_counter() - start,
        mean_norm=float(np.linalg.norm(mean)),
    )
    return centred, report


__all__ = [
    "SELF",
    "Background",
    "CentreReport",
    "centre_filter",
    "check_background_dim",
    "read_background",
    "sample_background",
]
