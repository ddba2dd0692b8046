"""`--band auto`: choose which directions to remove from the singular values alone (no data).

The rule ("above the bulk's ceiling; an octave below its floor"):
  1. The bulk: fit a straight line log σ_i ≈ α + β·i over the middle half of the spectrum
     (i in [d/4, 3d/4)), by least squares. Its scatter w = max |residual| over that range is how
     far a value that belongs to the bulk strays from the line.
  2. Top R: the leading directions whose σ is above the bulk's CEILING: log σ_i > α + w, i.e.
     larger than the biggest value the bulk trend itself reaches (its value at i = 0), by more
     than the bulk's own scatter. Such a direction cannot be placed anywhere on the bulk trend; it
     is part of the frequency-writing "shoulder" (σ_1, the mean-row direction, and the values that
     still decay faster than the bulk after it). Counted from σ_1 until the first one that is not;
     it always stops before d/4, where the fit starts. There is no tuned constant here: α and w
     come from the spectrum.
  3. Bottom B: the trailing directions more than a factor `factor` (default 2, an octave) BELOW
     the line, log σ_i < α + β·i − ln(factor), counted from σ_d upwards until the first one that
     is not. The bottom needs a tolerance rather than the ceiling's mirror image: every spectrum
     curves down at its lower edge (a soft edge), so "below the trend's lowest value" would cut
     deep into the bulk (75 of 576 directions on SmolLM2), and removing more than a few dozen
     bottom directions loses content on every task we measured. Only the values that have fallen
     off the edge — at less than half the trend — are removed.

Both parts are scale-free (multiplying W_U by a constant changes nothing), and a pure geometric
decay (an exact line) removes nothing. Exact zeros (a rank-deficient W_U) count as bottom outliers.

On SmolLM2-135M this gives R = 40, B = 4: σ_1 = 510 down to σ_40 ≈ 26.1 stand above the ceiling
(α: 25.8, scatter 1%), and the last 4 values (σ ≤ 7.85 against a trend of ~16) are off the edge.
Evidence (Lee, split halves, a self-supervised retrieval task, four recipes) in bench/RESULTS.md.
The previous rule (a symmetric factor of 1.5 at both ends: R = 6, B = 13) is `auto_band(...,
rule="symmetric")` for comparison.

Not handled: spectra with fewer than 8 values (no meaningful bulk), partial spectra from the
randomized solver (the bottom is unknown; use the exact solver).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embfilter_cli.errors import BandError
from embfilter_cli.filters.band import Band

DEFAULT_FACTOR = 2.0
SYMMETRIC_FACTOR = 1.5  # the previous rule's factor, used at both ends by rule="symmetric"
MIN_VALUES = 8
RULES = ("ceiling", "symmetric")


@dataclass
class AutoBand:
    """The chosen band and the numbers behind it (for `fit --json` and `eval`)."""

    band: Band
    factor: float
    slope: float  # of log σ per index, over the bulk
    intercept: float
    fit_range: tuple[int, int]
    rule: str = "ceiling"
    scatter: float = 0.0  # max |log residual| inside the fit range
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The rule, its fit and the chosen band as a JSON-ready dict."""
        return {
            "rule": (
                "top: above the log-linear bulk's ceiling; bottom: more than `factor` below the bulk trend"
                if self.rule == "ceiling"
                else "outliers from the log-linear bulk trend (symmetric factor)"
            ),
            "name": self.rule,
            "factor": self.factor,
            "fit_range": list(self.fit_range),
            "slope": self.slope,
            "intercept": self.intercept,
            "scatter": self.scatter,
            "top": self.band.top,
            "bottom": self.band.bottom,
            **self.details,
        }


def auto_band(singular_values: np.ndarray, factor: float | None = None, rule: str = "ceiling") -> AutoBand:
    """Apply the rule in the module docstring to descending singular values.

    Args:
        singular_values: all d singular values of W_U, descending (a complete spectrum).
        factor: how far (multiplicatively) below the bulk line a trailing value must sit to be
            removed; > 1. Default 2 (rule "ceiling") or 1.5 at both ends (rule "symmetric").
        rule: "ceiling" (the default, above) or "symmetric" (the previous rule: leading values more
            than `factor` above the line, trailing ones more than `factor` below it).

    Returns:
        The band (top R and bottom B removed) and the fitted line.

    Raises:
        BandError: fewer than 8 values, values not descending, factor <= 1 or an unknown rule.
    """
    if rule not in RULES:
        raise BandError(f"unknown auto-band rule {rule!r}; use one of {', '.join(RULES)}")
    if factor is None:
        factor = DEFAULT_FACTOR if rule == "ceiling" else SYMMETRIC_FACTOR
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
    scatter = float(np.max(np.abs(residual[lo:hi])))
    limit = float(np.log(factor))
    if rule == "ceiling":
        # Above the highest point of the bulk line (its value at i = 0, or anywhere if it rises), plus its scatter.
        ceiling = float(intercept + max(0.0, slope * (d - 1))) + scatter
        # No value of the fit range can pass (it sits within the scatter of a falling line), so R < d/4.
        top = _leading_run(logs > ceiling)
    else:
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
        rule=rule,
        scatter=scatter,
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
