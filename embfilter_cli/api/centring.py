"""Centring a filter on a background set: the one path behind `fit --center-on`, `center` and `Filter.center`.

`read_background_for` reads what the CLI's TEXTS argument names (a texts file, `-`, or a .npy of raw
embeddings); `background_of` also accepts in-memory texts and arrays (the library's `Filter.center`);
`centre` embeds the background with the filter's model and returns the centred copy plus a report,
saying what it does through `Hooks`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.api.hooks import Hooks, hooks_or_default
from embfilter_cli.errors import InputDataError

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.model.location import ModelLocation
    from embfilter_cli.text.background import Background, CentreReport
    from embfilter_cli.text.self_samples import SelfSampling


def read_background_for(
    texts: str,
    pooling: str,
    recipe: str,
    input_format: str,
    hooks: Hooks | None = None,
    *,
    sampling: SelfSampling | None = None,
    save_texts: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Background:
    """Check `pooling`/`recipe`, read the background (texts, .npy, or "self") and warn about skipped blank lines.

    `fit --center-on` calls it before the decomposition, so bad input fails at once. "self" returns a
    background still to be sampled (`centre` samples it) with `sampling` (default: `SelfSampling()`);
    `save_texts` (only with "self") is checked writable here and receives the sampled texts as JSONL.
    """
    from embfilter_cli.text.background import read_background
    from embfilter_cli.text.recipes import check_pooling, resolve_recipe
    from embfilter_cli.text.texts import describe_skipped

    check_pooling(pooling)
    resolve_recipe(recipe)  # a bad template fails before anything is read or loaded
    if save_texts is not None:
        from embfilter_cli.errors import UsageError
        from embfilter_cli.files import check_writable

        if texts != "self":
            raise UsageError(f"--save-texts keeps the texts of --center-on self; the background here is {texts}")
        check_writable(save_texts, force)
    background = read_background(texts, input_format, sampling=sampling)
    if background.skipped:
        hooks_or_default(hooks).warn(describe_skipped(background.skipped))
    return background


def background_of(
    source: str | os.PathLike[str] | list[str] | np.ndarray,
    pooling: str,
    recipe: str,
    input_format: str = "auto",
    hooks: Hooks | None = None,
    *,
    sampling: SelfSampling | None = None,
    save_texts: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Background:
    """A background from a path or "self" (as `read_background_for`), a list of texts, or an (n, d) array of raw
    embeddings."""
    from embfilter_cli.filters.centering import texts_sha256
    from embfilter_cli.text.background import Background

    if isinstance(source, (str, os.PathLike)):
        return read_background_for(
            os.fspath(source),
            pooling,
            recipe,
            input_format,
            hooks,
            sampling=sampling,
            save_texts=save_texts,
            force=force,
        )
    from embfilter_cli.text.recipes import check_pooling, resolve_recipe

    check_pooling(pooling)
    resolve_recipe(recipe)
    if isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not isinstance(source, (list, tuple))):
        array = np.asarray(source)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating) or array.shape[0] == 0:
            raise InputDataError(
                f"the background array has dtype {array.dtype} and shape {tuple(array.shape)}; centring needs a "
                "non-empty 2-D (n, d) float array of raw embeddings"
            )
        from embfilter_cli.filters.artifact import array_sha256

        return Background("<array>", embeddings=array, sha256=array_sha256(array))
    texts = list(source)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputDataError(f"background item {bad[0]} is a {type(texts[bad[0]]).__name__}, not a text")
    kept = [t for t in texts if t.strip()]
    skipped = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if not kept:
        raise InputDataError("the background holds no non-empty text; centring needs at least one")
    if skipped:
        from embfilter_cli.text.texts import describe_skipped

        hooks_or_default(hooks).warn(describe_skipped(skipped))
    return Background("<texts>", texts=kept, sha256=texts_sha256(kept), skipped=skipped)


def filter_model_for_centring(artifact: FilterArtifact, model: str | None, revision: str | None) -> ModelLocation:
    """Resolve `model` (default: the filter's own model) and refuse one with another W_U."""
    from embfilter_cli.model.head import locate_for_filter, read_head_for_filter

    _, location = locate_for_filter(model, revision, artifact)
    read_head_for_filter(location, artifact)
    return location


def centre(
    artifact: FilterArtifact,
    background: Background,
    location: ModelLocation | None,
    pooling: str,
    recipe: str,
    max_length: int,
    batch_size: int,
    device: str,
    dtype: str,
    hooks: Hooks | None = None,
    *,
    save_texts: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> tuple[FilterArtifact, CentreReport]:
    """`text.background.centre_filter` with an info line, a progress bar and the truncation warning.

    A "self" background is sampled first (its own bar; `save_texts`, if set, then receives the texts as JSONL),
    and the model loaded for sampling embeds them too.
    """
    from embfilter_cli.text.background import centre_filter, sample_background

    h = hooks_or_default(hooks)
    encoder = None
    if background.pending:
        s = background.sampling
        assert s is not None and location is not None  # pending: sampling set; centre_on/fit resolve the model
        h.info(
            f"Sampling {s.count} texts of up to {s.new_tokens} tokens from the model "
            f"(temperature {s.temperature:g}, seed {s.seed})…"
        )
        with h.bar("Sampling", s.count) as progress:
            background, encoder = sample_background(
                background, location, device=device, dtype=dtype, progress=progress, notify=h.notice
            )
        h.info(f"Sampled {background.count} texts" + (" (from the cache)" if encoder is None else ""))
        if save_texts is not None:
            from embfilter_cli.text.self_samples import save_texts_jsonl

            save_texts_jsonl(background.texts or [], os.fspath(save_texts), force)
            h.info(f"Wrote the sampled texts to {save_texts}")
    what = "texts" if background.embeddings is None else "pre-computed embeddings"
    h.info(f"Centring on {background.count} {what} from {background.input} ({pooling} pooling, recipe {recipe})…")
    with h.bar("Embedding", background.count) as progress:
        centred, report = centre_filter(
            artifact,
            background,
            location=location,
            pooling=pooling,
            recipe=recipe,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress,
            encoder=encoder,
        )
    if report.truncated:
        h.warn(f"{report.truncated} background text(s) exceeded --max-length {max_length} tokens and were cut")
    return centred, report


def centre_on(
    artifact: FilterArtifact,
    source: str | os.PathLike[str] | list[str] | np.ndarray,
    *,
    model: str | None = None,
    revision: str | None = None,
    pooling: str = "mean",
    recipe: str = "none",
    max_length: int = 512,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    input_format: str = "auto",
    hooks: Hooks | None = None,
    sampling: SelfSampling | None = None,
    save_texts: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> tuple[FilterArtifact, CentreReport]:
    """Read the background, find the filter's model (texts and "self") and centre: `embfilter center` without the
    file handling, and `Filter.center`. `source="self"` samples the model's own texts (`sampling`)."""
    from embfilter_cli.text.background import check_background_dim

    h = hooks_or_default(hooks)
    background = background_of(
        source, pooling, recipe, input_format, h, sampling=sampling, save_texts=save_texts, force=force
    )
    check_background_dim(background, artifact.hidden_size, str(artifact.path or "the filter"))
    location = None
    if background.embeddings is None:
        location = filter_model_for_centring(artifact, model, revision)
        h.info(f"Model: {location.source} ({location.kind.replace('_', ' ')})")
    return centre(
        artifact,
        background,
        location,
        pooling,
        recipe,
        max_length,
        batch_size,
        device,
        dtype,
        h,
        save_texts=save_texts,
        force=force,
    )


def centring_summary(artifact: FilterArtifact, report: CentreReport) -> dict[str, Any]:
    """JSON-ready facts about a freshly centred filter (`center`'s summary, `fit --center-on`'s "centering")."""
    return {
        "output": str(artifact.path),
        "output_dim": artifact.output_dim,
        "centering": artifact.centering.as_dict() if artifact.centering is not None else None,
        "mean_sha256": artifact.metadata.get("mean_sha256"),  # set when saved
        "mean_norm": report.mean_norm,
        "truncated": report.truncated,
        "seconds": round(report.seconds, 3),
    }


__all__ = [
    "background_of",
    "centre",
    "centre_on",
    "centring_summary",
    "filter_model_for_centring",
    "read_background_for",
]
