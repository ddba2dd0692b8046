"""Fitting a filter: the one path behind `embfilter fit` and `embfilter_cli.fit`.

`fit_filter` finds the model, reads only W_U, decomposes it, builds the filter, optionally centres
it and saves it; it returns the filter with the facts `fit` reports. `fit` is the library's face
of it: the same defaults and checks, a `Filter` back, nothing saved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.api.hooks import Hooks, hooks_or_default

if TYPE_CHECKING:
    from embfilter_cli.api.filter import Filter
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.filters.band import Band
    from embfilter_cli.filters.spectral import Spectrum
    from embfilter_cli.model.unembedding import Unembedding
    from embfilter_cli.text.background import CentreReport
    from embfilter_cli.text.self_samples import SelfSampling

CenterSource = str | os.PathLike[str] | list[str] | np.ndarray


@dataclass
class FitSettings:
    """Everything `embfilter fit` takes besides the output: the model, band, solver and centring options."""

    model: str | None = None
    revision: str | None = None
    tensor: str | None = None
    rank: int | None = None
    bottom: int | None = None
    ratio: float | None = None
    start: int | None = None
    keep: int | None = None
    band: str | None = None  # "auto"; None: auto unless a band option is given
    reduce: bool = True
    solver: str = "auto"
    device: str = "auto"
    oversample: int | None = None
    power_iters: int | None = None  # None: iterate until `tol` is certified
    tol: float = 1e-3
    seed: int = 0
    precision: str = "float64"
    padding_rows: str = "drop"
    center_on: CenterSource | None = None
    pooling: str = "mean"
    recipe: str = "none"
    batch_size: int = 16
    max_length: int = 512
    dtype: str = "auto"
    input_format: str = "auto"
    self_sampling: SelfSampling | None = None  # center_on="self": how the model samples (default SelfSampling())
    save_texts: str | None = None  # center_on="self": also write the sampled texts here (JSONL)


@dataclass
class FitResult:
    """A fitted (and maybe centred, maybe saved) filter and what `fit` reports about it."""

    artifact: FilterArtifact
    spectrum: Spectrum
    band: Band
    rule: dict[str, Any]
    centring: CentreReport | None = None

    def summary(self) -> dict[str, Any]:
        """`embfilter fit --json`'s document."""
        from embfilter_cli.api.centring import centring_summary
        from embfilter_cli.filters.fitting import fit_summary

        summary = fit_summary(self.artifact, self.spectrum, self.band, self.rule)
        if self.centring is not None:
            summary["centering"] = centring_summary(self.artifact, self.centring)
        return summary


def head_line(unemb: Unembedding) -> str:
    """The log line describing the W_U that was read (tied, padding rows dropped)."""
    dropped = unemb.stored_rows - unemb.vocab_size
    return (
        f"W_U: {unemb.tensor_name} {unemb.stored_rows}×{unemb.hidden_size} {unemb.stored_dtype}"
        + (" (tied input embeddings)" if unemb.tied else "")
        + (f"; dropped {dropped} padding rows past the tokenizer's {unemb.vocab_size}" if dropped else "")
    )


def fit_filter(
    settings: FitSettings,
    *,
    output: str | os.PathLike[str] | None = None,
    save: bool = False,
    force: bool = False,
    hooks: Hooks | None = None,
) -> FitResult:
    """Fit (and with `settings.center_on` centre) a filter; with `save`, write it to `output` or the default path.

    Cheap checks run first: the output is checked writable before any download or decomposition, the
    background is read before the decomposition, and the default output name (known only after it) is
    checked before the background is embedded.
    """
    from embfilter_cli.files import check_writable
    from embfilter_cli.filters.solve import BandRequest, SolverOptions, fit_spectrum
    from embfilter_cli.model.locate import resolve_model

    h = hooks_or_default(hooks)
    s = settings
    if save and output is not None:
        check_writable(output, force)  # fail before any download or decomposition
    background = None
    head_only = s.center_on is None or (isinstance(s.center_on, str) and s.center_on == "none")  # ./none: a file
    if not head_only or s.save_texts:  # read before the decomposition, so empty or unreadable texts fail in a second
        from embfilter_cli.api.centring import background_of

        background = background_of(
            "none" if s.center_on is None else s.center_on,
            s.pooling,
            s.recipe,
            s.input_format,
            h,
            sampling=s.self_sampling,
            save_texts=s.save_texts,
            force=force,
        )
    request = BandRequest(s.rank, s.bottom, s.ratio, s.start, s.keep, s.band).checked(s.solver)
    location = resolve_model(
        s.model, revision=s.revision, tensor_name=s.tensor, progress=h.downloads, check_config=request.check_config
    )
    h.info(f"Model: {location.source} ({location.kind.replace('_', ' ')})")
    from embfilter_cli.model.head import read_head  # torch: only after cheap checks and downloads of metadata

    unemb = read_head(location, tensor_name=s.tensor, drop_padding_rows=s.padding_rows == "drop")
    if background is not None:
        from embfilter_cli.text.background import check_background_dim

        check_background_dim(background, unemb.hidden_size, f"a filter for {location.source}")  # before solving
    h.info(head_line(unemb))
    options = SolverOptions(s.solver, s.device, s.oversample, s.power_iters, s.tol, s.seed, s.precision)
    band, spectrum, rule = fit_spectrum(unemb.matrix, request, options, log=h.info, bar=h.bar)
    from embfilter_cli.filters.artifact import default_artifact_path, save_artifact
    from embfilter_cli.filters.fitting import build_artifact

    artifact = build_artifact(
        spectrum,
        band,
        reduce=s.reduce,
        model_source=location.source,
        model_revision=location.revision,
        tensor_name=unemb.tensor_name,
        unembedding_sha256=unemb.sha256,
        vocab_size=unemb.vocab_size,
        stored_rows=unemb.stored_rows,
    )
    out = Path(output) if output else default_artifact_path(location, band)
    report = None
    if background is not None:
        from embfilter_cli.api.centring import centre

        if save:
            check_writable(out, force)  # the default name is known only now: fail before embedding
        artifact, report = centre(
            artifact,
            background,
            location,
            s.pooling,
            s.recipe,
            s.max_length,
            s.batch_size,
            s.device,
            s.dtype,
            h,
            save_texts=s.save_texts,
            force=force,
        )
    if save:
        save_artifact(artifact, out, force=force)
    return FitResult(artifact, spectrum, band, rule, report)


def fit(
    model: str | None = None,
    *,
    rank: int | None = None,
    bottom: int | None = None,
    ratio: float | None = None,
    start: int | None = None,
    keep: int | None = None,
    band: str | None = None,
    center_on: CenterSource | None = None,
    pooling: str = "mean",
    recipe: str = "none",
    solver: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    tensor: str | None = None,
    reduce: bool = True,
    oversample: int | None = None,
    power_iters: int | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    precision: str = "float64",
    padding_rows: str = "drop",
    batch_size: int = 16,
    max_length: int = 512,
    dtype: str = "auto",
    self_sampling: SelfSampling | None = None,
    hooks: Hooks | None = None,
) -> Filter:
    """Fit a filter on a model's unembedding matrix, as `embfilter fit` does (nothing is saved).

    Args:
        model: alias (`embfilter models`), Hub id, model folder, .safetensors or .gguf file; None is the
            built-in SmolLM2-135M-Instruct GGUF.
        rank, bottom: remove the top `rank` and the lowest `bottom` directions.
        ratio: the paper's preset, keep the central d // ratio directions.
        start, keep: an explicit window of kept directions.
        band: "auto" picks top and bottom from the spectrum alone; None (the default) means "auto" unless a
            band option above is given (with `solver="randomized"`: the top 64 removed), as in the CLI.
        center_on: also centre the filter on this background: a texts file, a list of texts, an (n, d)
            array of raw embeddings, or "self" (texts the model samples itself, as `self_sampling` says),
            embedded with `pooling`, `recipe`, `max_length`, `batch_size`, `dtype`. None or "none": head-only.
        self_sampling: how `center_on="self"` samples (count, tokens, temperature, seed, start); default
            `SelfSampling()`, the measured defaults.
        solver, device, oversample, power_iters, tol, seed, precision, padding_rows, revision, tensor, reduce:
            as `embfilter fit --help` describes them (`power_iters=None` is `--power-iters auto`).
        hooks: where log lines, warnings and progress go (default: the "embfilter" logger, no bars).

    Returns:
        The fitted `Filter` (save it with `Filter.save`).

    Raises:
        EmbfilterError: the subclasses and messages `embfilter fit` prints, e.g. BandError for a band that
            does not fit the hidden size, ModelNotFoundError for a model that is not there.

    Example:
        >>> import embfilter_cli
        >>> f = embfilter_cli.fit(rank=64, bottom=16)  # the built-in SmolLM2-135M
        >>> (f.input_dim, f.output_dim, f.band["top"], f.band["bottom"])
        (576, 496, 64, 16)
    """
    from embfilter_cli.api.filter import Filter

    settings = FitSettings(
        model=model,
        revision=revision,
        tensor=tensor,
        rank=rank,
        bottom=bottom,
        ratio=ratio,
        start=start,
        keep=keep,
        band=band,
        reduce=reduce,
        solver=solver,
        device=device,
        oversample=oversample,
        power_iters=power_iters,
        tol=tol,
        seed=seed,
        precision=precision,
        padding_rows=padding_rows,
        center_on=center_on,
        pooling=pooling,
        recipe=recipe,
        batch_size=batch_size,
        max_length=max_length,
        dtype=dtype,
        self_sampling=self_sampling,
    )
    return Filter(fit_filter(settings, hooks=hooks).artifact)


__all__ = ["FitResult", "FitSettings", "fit", "fit_filter", "head_line"]
