"""`--band auto`: choose which directions to remove from the singular values alone (no data).

The rule ("outliers from the bulk trend"):
  1. The bulk: fit a straight line to log σ_i against i over the middle half of the spectrum
     (i in [d/4, 3d/4)), by least squares. A spectrum that decays geometrically is exactly such
     a line, so it has no outliers and nothing is removed.
  2. Top R: the number of LEADING singular values that stand more than a factor `factor`
     (default 1.5) ABOVE the line, counted from σ_1 until the first one that does not.
  3. Bottom B: the number of TRAILING singular values more than the same factor BELOW the line,
     counted from σ_d upwards until the first one that does not.

The factor is symmetric in log space and the rule is scale-free (multiplying W_U by a constant
changes nothing). Exact zeros (a rank-deficient W_U) count as bottom outliers.

On SmolLM2-135M this gives R = 6, B = 13: σ_1 = 510 (the mean-row direction) down to σ_6 = 46.7
stand out above a bulk that decays from ~26 to ~17, and the last 13 values (σ ≤ 10.54 against a
trend of ~16) fall off below it. See bench/RESULTS.md for its Lee score next to swept bands.

Not handled: spectra with fewer than 8 values (no meaningful bulk), partial spectra from the
randomized solver (the bottom is unknown; use the exact solver).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embfilter_cli.errors import BandError
from embfilter_cli.filters.band import Band

DEFAULT_FACTOR = 1.5
MIN_VALUES = 8


@dataclass
class AutoBand:
    """The chosen band and the numbers behind it (for `fit --json` and `eval`)."""

    band: Band
    factor: float
    slope: float  # of log σ per index, over the bulk
    intercept: float
    fit_range: tuple[int, int]
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The rule, its fit and the chosen band as a JSON-ready dict."""
        return {
            "rule": "outliers from the log-linear bulk trend",
            "factor": self.factor,
            "fit_range": list(self.fit_range),
            "slope": self.slope,
            "intercept": self.intercept,
            "top": self.band.top,
            "bottom": self.band.bottom,
            **self.details,
        }


def auto_band(singular_values: np.ndarray, factor: float = DEFAULT_FACTOR) -> AutoBand:
    """Apply the rule in the module docstring to descending singular values.

    Args:
        singular_values: all d singular values of W_U, descending (a complete spectrum).
        factor: how far (multiplicatively) a value must sit from the bulk line to be removed; > 1.

    Returns:
        The band (top R and bottom B removed) and the fitted line.

    Raises:
        BandError: fewer than 8 values, values not descending, or factor <= 1.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    d = s.size
    if factor <= 1:
        raise BandError(f"the auto-band factor must be > 1, got {factor}")
    if d < MIN_VALUES:
        raise BandError(
            f"--band auto needs at least {MIN_VALUES} singular values to find a bulk, got {d}; name the band instead"
        )
    if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(np.diff(s) > 1e-9 * max(float(s[0]), 1.0)):
        raise BandError(
            "--band auto needs finite, non-negative, descending singular values (a complete exact spectrum)"
        )
    floor = max(float(s[0]), np.finfo(np.float64).tiny) * 1e-12  # log(0) would be -inf; zeros become deep outliers
    logs = np.log(np.maximum(s, floor))
    lo, hi = d // 4, max(d // 4 + 2, (3 * d) // 4)
    idx = np.arange(d, dtype=np.float64)
    slope, intercept = np.polyfit(idx[lo:hi], logs[lo:hi], 1)
    residual = logs - (slope * idx + intercept)
    limit = float(np.log(factor))
    top = _leading_run(residual > limit)
    bottom = _leading_run((residual < -limit)[::-1])
    # The bulk itself is never an outlier, so top + bottom < d; keep at least one direction regardless.
    bottom = min(bottom, d - top - 1)
    band = Band(d, top, d - top - bottom)
    return AutoBand(
        band=band,
        factor=float(factor),
        slope=float(slope),
        intercept=float(intercept),
        fit_range=(lo, hi),
        details={
            "sigma_last_removed_top": float(s[top - 1]) if top else None,
            "sigma_first_kept": float(s[top]),
            "sigma_last_kept": float(s[d - bottom - 1]),
            "sigma_first_removed_bottom": float(s[d - bottom]) if bottom else None,
        },
    )


def _leading_run(flags: np.ndarray) -> int:
    """Length of the run of True at the start of `flags`."""
    if flags.all():
        return int(flags.size)
    return int(np.argmin(flags))
