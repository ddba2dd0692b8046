"""The spectrum of a model's head: which solver runs where, and the exact spectrum cached on disk.

`model/head.py` turns a location into W_U and its facts; this module (one layer up, because it
needs the solvers of `filters/spectral.py`) turns W_U into its spectrum:

- `solve`: the solver policy of `embfilter fit`. `auto` is exact up to `AUTO_EXACT_MAX_HIDDEN`
  (or whenever bottom directions are removed), randomized beyond; randomized computes top
  directions only; MPS has no float64, so the exact solver runs on the CPU there.
- `exact_spectrum_of`: the exact spectrum with fit's settings (float64 Gram + eigh), for the
  commands that need every direction (`inspect`, `eval`).
- `head_spectrum`: W_U's facts and (optionally) its exact spectrum through a `SpectrumStore`
  (the on-disk cache of `text/cache.py`), so a second run reads neither weights nor solver.

Progress and log lines go through callbacks; nothing here prints.

Not handled: caching randomized spectra (they depend on seed, tolerance and rank).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from embfilter_cli.errors import BandError

if TYPE_CHECKING:
    import torch

    from embfilter_cli.filters.band import Band
    from embfilter_cli.filters.spectral import Spectrum
    from embfilter_cli.model.head import HeadFacts
    from embfilter_cli.model.location import ModelLocation

AUTO_EXACT_MAX_HIDDEN = 16384  # exact's d×d float64 Gram is 2 GiB at this size; beyond it, randomized
EXACT_MESSAGE = "Computing the exact spectrum of W_U (float64 Gram + eigh)"

DEFAULT_RANK = 64  # fit's band when none is named and the solver is randomized (else: the auto rule)
Log = Callable[[str], None]
Progress = Callable[[int, int], None]  # (rows done, rows total)
BarFactory = Callable[[str, int], contextlib.AbstractContextManager[Progress | None]]  # (description, total)


def _silent(message: str) -> None:
    """The default log: drop the line."""


@dataclass
class SolverOptions:
    """How `embfilter fit` asked for the spectrum (its --solver/--device/... options)."""

    solver: str = "auto"  # auto | exact | randomized
    device: str = "auto"
    oversample: int | None = None
    power_iters: int | None = None  # None: iterate until `tol` is certified
    tol: float = 1e-3
    seed: int = 0
    precision: str = "float64"  # exact: float64 | float32 chunk Grams


@contextlib.contextmanager
def _no_bar(description: str, total: int) -> Any:
    yield None


@dataclass
class BandRequest:
    """The band `embfilter fit` was asked for: the band options, or `rule="auto"` (from the spectrum)."""

    rank: int | None = None
    bottom: int | None = None
    ratio: float | None = None
    start: int | None = None
    keep: int | None = None
    rule: str | None = None  # "auto": choose top and bottom from the spectrum alone

    def checked(self, solver: str) -> BandRequest:
        """Refuse `--band auto` with band options or the randomized solver.

        No band named means `--band auto` (bench/RESULTS.md has the evidence), except with
        `--solver randomized`, which only finds the top of the spectrum: then the top 64 removed.
        """
        named = (self.rank, self.bottom, self.ratio, self.start, self.keep)
        if self.rule == "auto":
            if any(v is not None for v in named) or solver == "randomized":
                raise BandError(
                    "--band auto chooses the band itself; drop --rank/--bottom/--ratio/--start/--keep and "
                    "--solver randomized"
                )
            return self
        if any(v is not None for v in named):
            return self
        return replace(self, rank=DEFAULT_RANK) if solver == "randomized" else replace(self, rule="auto")

    def resolve(self, hidden_size: int) -> Band:
        """The named band for a hidden size (not for `rule="auto"`)."""
        from embfilter_cli.filters.band import resolve_band

        return resolve_band(
            hidden_size, rank=self.rank, bottom=self.bottom, ratio=self.ratio, start=self.start, keep=self.keep
        )

    def check_config(self, config: dict[str, Any]) -> None:
        """Reject an impossible band from a Hub model's config.json, before its weights are downloaded."""
        from embfilter_cli.model.hub import config_hidden_size

        d = config_hidden_size(config)
        if d is not None and self.rule != "auto":  # W_U's own width is checked again after reading it
            self.resolve(d)


def fit_spectrum(
    matrix: torch.Tensor, request: BandRequest, options: SolverOptions, log: Log = _silent, bar: BarFactory = _no_bar
) -> tuple[Band, Spectrum, dict[str, Any]]:
    """The band and the spectrum `embfilter fit` builds its filter from, plus the rule that chose it.

    `--band auto` decomposes exactly and lets `band_auto.auto_band` pick top and bottom; otherwise
    the named band is solved by the solver policy. `bar` draws progress while an exact Gram
    accumulates.
    """
    from embfilter_cli.filters.band import Band

    d = int(matrix.shape[1])
    if request.rule == "auto":
        from embfilter_cli.filters.band_auto import auto_band

        spectrum = _solve_with_bar(matrix, Band(d, 0, d), replace(options, solver="exact"), log, bar)
        chosen = auto_band(spectrum.singular_values)
        band = chosen.band
        log(
            f"--band auto: remove top {band.top} (σ above the bulk trend's ceiling {math.exp(chosen.intercept):.4g}) "
            f"and bottom {band.bottom} (σ under 1/{chosen.factor:g} of the trend)"
        )
        return band, spectrum, {"band_rule": chosen.as_dict()}
    band = request.resolve(d)
    return band, _solve_with_bar(matrix, band, options, log, bar), {}


def _solve_with_bar(matrix: torch.Tensor, band: Band, options: SolverOptions, log: Log, bar: BarFactory) -> Spectrum:
    exact = choose_solver(band, options.solver) == "exact"
    with bar("W_Uᵀ W_U", int(matrix.shape[0])) if exact else contextlib.nullcontext() as progress:
        return solve(matrix, band, options, log=log, progress=progress)


def choose_solver(band: Band, solver: str) -> str:
    """`auto` → exact unless d exceeds `AUTO_EXACT_MAX_HIDDEN` and only top directions go."""
    if solver == "auto":
        return "exact" if band.hidden_size <= AUTO_EXACT_MAX_HIDDEN or band.bottom else "randomized"
    return solver


def solve(
    matrix: torch.Tensor,
    band: Band,
    options: SolverOptions,
    log: Log = _silent,
    progress: Progress | None = None,
) -> Spectrum:
    """The spectrum of `matrix` that `band` needs, by `options`' solver policy (see module docstring).

    Args:
        log: receives the one-line description of the solver that runs.
        progress: exact solver only: called with (rows done, rows total) while the Gram accumulates.

    Raises:
        BandError: randomized asked for a band with bottom directions or no top ones.
    """
    from embfilter_cli.filters.spectral import exact_spectrum, randomized_spectrum, resolve_device

    dev = resolve_device(options.device)
    solver = choose_solver(band, options.solver)
    if solver == "randomized":
        if band.bottom or band.top == 0:
            raise BandError(
                f"--solver randomized computes only the top directions; it supports --rank R > 0 with no bottom "
                f"removal (asked: top {band.top}, bottom {band.bottom}); use --solver exact"
            )
        log(f"Solver: randomized subspace iteration, top {band.top} on {dev}")
        return randomized_spectrum(
            matrix,
            band.top,
            oversample=options.oversample,
            power_iters=options.power_iters,
            tol=options.tol,
            seed=options.seed,
            device=dev,
        )
    if dev.type == "mps":
        import torch

        # MPS has no float64; the exact solver's Gram must not drop to float32 silently.
        log("MPS has no float64: running the exact solver on the CPU")
        dev = torch.device("cpu")
    log(f"Solver: exact ({options.precision} Gram + float64 eigh) on {dev}")
    return exact_spectrum(matrix, device=dev, precision=options.precision, progress=progress)


def exact_spectrum_of(matrix: torch.Tensor, device: str | None = None, log: Log = _silent) -> Spectrum:
    """Every direction of `matrix` (float64 Gram + eigh), announced on `log` first (it can take a while).

    Args:
        device: a device name; None runs the solver's own default (the CPU).
    """
    from embfilter_cli.filters import spectral

    log(EXACT_MESSAGE)
    if device is None:
        return spectral.exact_spectrum(matrix)
    return spectral.exact_spectrum(matrix, device=spectral.resolve_device(device))


class SpectrumStore(Protocol):
    """Where `head_spectrum` keeps what it computed (`text.cache.Cache` is one)."""

    def load_spectrum(self, key: str) -> tuple[Spectrum, dict[str, Any]] | None:
        """A stored (spectrum, head facts) under `key`, or None."""

    def save_spectrum(self, key: str, spectrum: Spectrum, head: dict[str, Any]) -> None:
        """Store a spectrum and its head facts under `key`."""

    def load_json(self, kind: str, key: str) -> dict[str, Any] | None:
        """A stored JSON object of `kind` under `key`, or None."""

    def save_json(self, kind: str, key: str, value: dict[str, Any]) -> None:
        """Store a JSON object of `kind` under `key`."""


def head_spectrum(
    location: ModelLocation, store: SpectrumStore, key: str, device: str = "auto", need_spectrum: bool = True
) -> tuple[HeadFacts, Spectrum | None, bool]:
    """W_U's facts and (optionally) its exact spectrum, from `store` under `key` when possible.

    Uses the same defaults as `embfilter fit` (default tensor choice, padding rows dropped), so a
    band saved from here equals `fit`'s filter for that band. Returns (facts, spectrum, from_store).
    """
    from embfilter_cli.model.head import HeadFacts, facts_of, read_head

    if need_spectrum:
        hit = store.load_spectrum(key)
        if hit is not None:
            spectrum, head = hit
            return HeadFacts(**head), spectrum, True
    else:
        cached = store.load_json("heads", key)
        if cached is not None:
            with contextlib.suppress(TypeError):
                return HeadFacts(**cached), None, True
    unemb = read_head(location)
    facts = facts_of(unemb)
    store.save_json("heads", key, facts.as_dict())
    if not need_spectrum:
        return facts, None, False
    spectrum = exact_spectrum_of(unemb.matrix, device=device)
    store.save_spectrum(key, spectrum, facts.as_dict())
    return facts, spectrum, False
