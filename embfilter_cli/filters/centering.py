"""Centring: a filter as the affine map y = P·x − m, with m the mean of the FILTERED background vectors.

Subtracting the mean embedding of a set of unlabeled "background" texts removes the direction all
embeddings of a model share (measured on SmolLM2-135M / Lee: filter 0.604, centring 0.607, filter
then centring 0.640 Spearman; see /work/shared/EMBEDFILTER.md). Because P is linear, the mean of
the filtered vectors is P·x̄, so m can be computed once from the raw background embeddings and
stored with the filter; applying it is one subtraction after the projection, before any
L2-normalisation.

Everything here is pure numpy: the mean, the affine map, the SHA-256 of the background texts and
the `Centering` record that the artifact stores as JSON metadata (how the mean was made).

Not handled: embedding the texts (`embfilter_cli.text.background`), reading or writing artifacts
(`embfilter_cli.filters.artifact`), principal-component removal or whitening (they hurt in our
measurements; see issue 9).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from embfilter_cli.errors import ArtifactError, InputDataError
from embfilter_cli.jsonable import loads as json_loads

# Rows summed per step: bounds the float64 copy of a memory-mapped background file.
_CHUNK_ROWS = 8192
SOURCES = ("texts", "embeddings")


def filtered_mean(raw: np.ndarray, projection: np.ndarray, *, where: str = "the background") -> np.ndarray:
    """The mean of P·x over the rows x of `raw`, in float64.

    Args:
        raw: (n, d) raw embeddings (any float dtype; a memory map is read in chunks).
        projection: (k, d) filter matrix P.
        where: how to name `raw` in error messages (a path).

    Returns:
        (k,) float64; equals mean_i(P·x_i) = P·mean_i(x_i) up to rounding.

    Raises:
        InputDataError: not a 2-D array, no rows, wrong dimension (naming both), NaN/Inf.
    """
    d = projection.shape[1]
    if raw.ndim != 2:
        raise InputDataError(f"{where} has shape {tuple(raw.shape)}; centring needs a 2-D (n, {d}) array of embeddings")
    n, dim = raw.shape
    if dim != d:
        raise InputDataError(
            f"{where} holds {dim}-dimensional vectors but the filter expects {d}; embed the background with the "
            "model the filter was fitted on"
        )
    if n == 0:
        raise InputDataError(f"{where} holds no vectors; centring needs at least one background embedding")
    if not np.issubdtype(raw.dtype, np.floating):
        raise InputDataError(f"{where} has dtype {raw.dtype}; centring needs float embeddings")
    total = np.zeros(d, dtype=np.float64)
    for r0 in range(0, n, _CHUNK_ROWS):
        chunk = np.asarray(raw[r0 : r0 + _CHUNK_ROWS], dtype=np.float64)
        if not np.isfinite(chunk).all():
            bad = r0 + int(np.argmax(~np.isfinite(chunk).all(axis=1)))
            raise InputDataError(f"{where} row {bad} holds NaN or Inf; remove it before centring")
        total += chunk.sum(axis=0)
    mean = projection.astype(np.float64) @ (total / n)  # float64 sums: rows near float32's limit cannot overflow
    # The filter stores the mean as float32: refuse one that would be stored as ±Inf.
    biggest = float(np.abs(mean).max()) if mean.size else 0.0
    if not biggest <= float(np.finfo(np.float32).max):
        raise InputDataError(
            f"the mean of the filtered {where} reaches {biggest:.3g}, beyond float32's range (±3.4e38) in which "
            "the filter stores it; scale the background embeddings down before centring"
        )
    return mean


def apply_affine(vectors: np.ndarray, projection: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """y = P·x − m on the last axis of `vectors`; float64 input stays float64, anything else float32.

    With `mean` None this is the plain projection P·x (a version-1 or uncentred filter).
    """
    wide = vectors.dtype == np.float64
    dtype = np.float64 if wide else np.float32
    y = np.asarray(vectors, dtype=dtype) @ projection.astype(dtype, copy=False).T
    if mean is not None:
        y -= mean.astype(dtype, copy=False)
    return y


def texts_sha256(texts: Sequence[str]) -> str:
    """SHA-256 identifying an ordered list of texts.

    Each text contributes its UTF-8 byte length as 8 little-endian bytes, then its bytes, so texts
    that contain newlines cannot collide with a different split of the same characters.
    """
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class Centering:
    """How a filter's mean was made; stored as the artifact's `centering` metadata (JSON).

    Attributes:
        count: number of background vectors averaged.
        source: "texts" (embedded by embfilter) or "embeddings" (a pre-computed .npy; then
            pooling, recipe, template and max_length are what the user DECLARED for it).
        sha256: SHA-256 of the texts (`texts_sha256`) or of the .npy array's bytes.
        pooling: "mean" or "last".
        recipe: the recipe name ("none", "prompteol", "summarize", "echo" or "custom").
        template: the prompt template with its `{text}` slot(s).
        max_length: the token budget the texts were embedded with.
        model_source: the model that embedded them.
        unembedding_sha256: that model's W_U SHA-256; equals the filter's own.
        input: the path the background came from ("-" for stdin, "self" for sampled texts), for people.
        sampling: for texts the model sampled itself (`--center-on self`): the sampler's settings,
            dtype, device type and model fingerprint (`text.self_samples`); None otherwise (and then
            absent from the JSON, so records made before it existed keep their bytes).
    """

    count: int
    source: str
    sha256: str
    pooling: str
    recipe: str
    template: str
    max_length: int
    model_source: str
    unembedding_sha256: str
    input: str = ""
    sampling: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The record as JSON text, for the artifact's metadata."""
        return json.dumps(self.as_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Centering:
        """Parse and validate the stored record; every defect is an ArtifactError."""
        try:
            raw = json_loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(
                f"{where}: the centering metadata is not valid JSON ({exc.msg}); recentre or refit it"
            ) from exc
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: the centering metadata is not a JSON object; recentre or refit it")
        types: dict[str, type] = {
            "count": int,
            "source": str,
            "sha256": str,
            "pooling": str,
            "recipe": str,
            "template": str,
            "max_length": int,
            "model_source": str,
            "unembedding_sha256": str,
        }
        missing = [k for k in types if k not in raw]
        wrong = [k for k, t in types.items() if k in raw and (not isinstance(raw[k], t) or isinstance(raw[k], bool))]
        if missing or wrong:
            raise ArtifactError(
                f"{where}: the centering metadata lacks {missing} or has wrongly typed {wrong}; recentre it with "
                "`embfilter center`"
            )
        if raw["count"] < 1 or raw["max_length"] < 1 or raw["source"] not in SOURCES:
            raise ArtifactError(
                f"{where}: the centering metadata is inconsistent (count {raw['count']}, max_length "
                f"{raw['max_length']}, source {raw['source']!r}); recentre it with `embfilter center`"
            )
        if "sampling" in raw and not (isinstance(raw["sampling"], dict) and raw["source"] == "texts"):
            raise ArtifactError(
                f"{where}: the centering metadata's sampling record is not a JSON object of sampled texts; "
                "recentre it with `embfilter center`"
            )
        return cls(**{k: raw[k] for k in (*types, "input", "sampling") if k in raw})

    def describe(self) -> str:
        """'mean of 300 filtered text embeddings (mean pooling, recipe none)' for reports."""
        what = "text embeddings" if self.source == "texts" else "pre-computed embeddings"
        how = ""
        if (s := self.sampling) is not None:
            what = "self-generated texts"
            how = (
                f"sampled by {s.get('sampler')}: {s.get('new_tokens')} new tokens from {s.get('start')}, "
                f"temperature {s.get('temperature')}, seed {s.get('seed')}, {s.get('dtype')} on {s.get('device')}; "
            )
        return f"mean of {self.count} filtered {what} ({how}{self.pooling} pooling, recipe {self.recipe})"

    def as_dict(self) -> dict[str, Any]:
        """The record as a plain dict (without `sampling` when there is none)."""
        out = asdict(self)
        if out["sampling"] is None:
            del out["sampling"]
        return out


def check_centering_use(centering: Centering | None, pooling: str, recipe: str, template: str, where: str) -> None:
    """Refuse to apply a centred filter to vectors pooled or prompted differently from its background.

    The mean is a point in the space of one pooling/recipe: last-token vectors of a prompt and mean-pooled
    raw vectors have different means, so subtracting the wrong one moves every vector off-centre.

    Args:
        centering: the filter's record, or None (uncentred filter: nothing to check).
        pooling, recipe, template: what this run embeds with (recipe name and its template).
        where: the filter's path, for the message.
    """
    if centering is None:
        return
    if centering.pooling == pooling and centering.recipe == recipe and centering.template == template:
        return
    asked = f"--pooling {pooling} --recipe {_quote(recipe if recipe != 'custom' else template)}"
    made = f"--pooling {centering.pooling} --recipe {_quote(centering.recipe if centering.recipe != 'custom' else centering.template)}"
    raise ArtifactError(
        f"{where} is centred on {centering.pooling}-pooled vectors with recipe {centering.recipe!r} but this run "
        f"uses {pooling} pooling with recipe {recipe!r}; run with {made}, or recentre the filter for this recipe: "
        f"`embfilter center {where} TEXTS {asked} -o NEW.safetensors`"
    )


def _quote(value: str) -> str:
    return value if value.replace("-", "").replace("_", "").isalnum() else "'" + value.replace("'", "'\\''") + "'"
