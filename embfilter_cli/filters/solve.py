"""The spectrum of a model's head: which solver runs where, and the exact spectrum cached on disk.

`model/head.py` turns a location into W_U and its facts; this module (one layer up, because it
needs the solvers of `filters/spectral.py`) turns W_U into its spectrum:

- `solve`: the solver policy of `embfilter fit`. `auto` is randomized beyond `AUTO_EXACT_MAX_HIDDEN`
  when only top directions go; below it, `refined` (float32 Gram, removed directions refined and
  certified in float64, `filters/refine.py`) on the CPU for a named band on a head big enough for
  the cheaper Gram to pay for the refinement pass (`refined_pays`), exact otherwise. A refined certificate that
  fails falls back to the exact solver, and the spectrum says so (`params["fallback_from"]`).
  Randomized computes top directions only; MPS has no float64, so exact and refined run on the CPU.
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
# `auto` picks refined from this much Gram work (rows·d² multiply-adds; Qwen2-7B: 2e12, SmolLM2-135M: 1.6e10):
# below it the whole exact solve takes about a second on 2 cores and the saving is not worth a second path.
AUTO_REFINED_MIN_WORK = 1e11
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

    solver: str = "auto"  # auto | exact | refined | randomized
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

    rows, d = int(matrix.shape[0]), int(matrix.shape[1])
    if request.rule == "auto":
        from embfilter_cli.filters.band_auto import auto_band

        # `auto` is exact here: the band is unknown before the Gram (see `refined_pays`).
        solver = options.solver if options.solver == "refined" else "exact"
        with bar("W_Uᵀ W_U", rows) as progress:
            spectrum, _ = solve_picking(
                matrix, lambda sigma: auto_band(sigma).band, replace(options, solver=solver), log, progress
            )
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
    gram = choose_solver(band, options.solver, int(matrix.shape[0]), options.device) != "randomized"
    with bar("W_Uᵀ W_U", int(matrix.shape[0])) if gram else contextlib.nullcontext() as progress:
        return solve(matrix, band, options, log=log, progress=progress)


def refined_pays(rows: int, hidden_size: int, removed: int | None, device: str = "cpu") -> bool:
    """Whether `auto` runs the refined solver: `removed` directions (None: not known yet) of a rows × d head.

    ssyrk runs at about twice dsyrk's rate, so the float32 Gram saves about rows·d²/4 multiply-adds'
    worth of time; the refinement costs two float64 passes of 2·rows·d·m multiply-adds with m ≈ 2r +
    guards + probes columns. So refined wins while 2r + 2·guard + probes < d/8, and only when the
    Gram is big enough to matter (`AUTO_REFINED_MIN_WORK`). With `--band auto` (`removed` None), r
    is unknown before the Gram and the rule's bands are too wide to pay on the spectra we measured
    (SmolLM2: 42 of 576 = 7% > the ~6% that pays; the 7B bench's synthetic spectrum: 15%), so auto
    stays exact there; `--solver refined` is the explicit choice. CUDA keeps exact too: a float64
    Gram is cheap there.
    """
    from embfilter_cli.filters.refine import DEFAULT_GUARD, DEFAULT_PROBES

    if device not in ("cpu", "auto", "mps") or (device == "auto" and _cuda_visible()):
        return False
    if rows * hidden_size * hidden_size < AUTO_REFINED_MIN_WORK:
        return False
    return removed is not None and 2 * removed + 2 * DEFAULT_GUARD + DEFAULT_PROBES < hidden_size / 8


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def choose_solver(band: Band, solver: str, rows: int = 0, device: str = "cpu") -> str:
    """`auto` → randomized beyond `AUTO_EXACT_MAX_HIDDEN` with top directions only; else refined or exact."""
    if solver == "auto":
        if band.hidden_size > AUTO_EXACT_MAX_HIDDEN and not band.bottom:
            return "randomized"
        return "refined" if refined_pays(rows, band.hidden_size, band.top + band.bottom, device) else "exact"
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
    from embfilter_cli.filters.spectral import randomized_spectrum, resolve_device

    dev = resolve_device(options.device)
    solver = choose_solver(band, options.solver, int(matrix.shape[0]), options.device)
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
    return solve_picking(matrix, lambda sigma: band, replace(options, solver=solver), log, progress)[0]


def solve_picking(
    matrix: torch.Tensor,
    pick_band: Callable[[Any], Band],
    options: SolverOptions,
    log: Log = _silent,
    progress: Progress | None = None,
) -> tuple[Spectrum, Band]:
    """A complete spectrum (exact or refined, `options.solver`) and the band `pick_band` chose from its σ.

    The refined solver needs the band before it refines (it refines only the removed directions),
    so the band is chosen from its float32-Gram values; when its certificate fails, the exact
    solver runs and the band is chosen again from the exact values.
    """
    import torch

    from embfilter_cli.filters.spectral import exact_spectrum, resolve_device

    dev = resolve_device(options.device)
    if dev.type == "mps":
        # MPS has no float64; the Gram and the refinement must not drop to float32 silently.
        log(f"MPS has no float64: running the {options.solver} solver on the CPU")
        dev = torch.device("cpu")
    if options.solver == "refined":
        from embfilter_cli.filters import refine

        log(
            f"Solver: refined (float32 Gram + float64 tridiagonal eigenvalues; removed directions refined and certified in float64) on {dev}"
        )
        refined, band = refine.refined_spectrum(
            matrix, pick_band, device=dev, tol=refine.DEFAULT_TOL, seed=options.seed, progress=progress
        )
        if refined.certificate["passed"]:
            return refined, band
        log(
            f"The refined solver's certificate failed ({refined.certificate.get('reason')}); "
            "falling back to the exact float64 solver"
        )
        spectrum = exact_spectrum(matrix, device=dev, progress=progress)
        spectrum.params["fallback_from"] = "refined"
        spectrum.certificate["refined"] = refined.certificate
        spectrum.seconds += refined.seconds
        return spectrum, pick_band(spectrum.singular_values)
    log(f"Solver: exact ({options.precision} Gram + float64 eigh) on {dev}")
    spectrum = exact_spectrum(matrix, device=dev, precision=options.precision, progress=progress)
    return spectrum, pick_band(spectrum.singular_values)


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
