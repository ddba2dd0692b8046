"""What `embfilter eval` was asked to score: the band lists and the baselines, parsed and checked.

With no --filter, --sweep-* or --ratio the default sweep runs (top 0..128 × bottom 0..64, τ = 2, 4, 8).
Impossible combinations raise `UsageError` (exit 2), before any model work.

Not handled: checks that need files (writability, matplotlib) or the data (the background texts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embfilter_cli.errors import UsageError

DEFAULT_TOPS = "0,1,2,4,8,16,32,64,128"
DEFAULT_BOTTOMS = "0,4,8,16,32,64"
DEFAULT_RATIOS = "2,4,8"


@dataclass
class EvalRequest:
    """The parsed lists: baselines' dimensions, the sweep's top R / bottom B values (None: no sweep), ratios."""

    abtt: list[int]
    whiten: list[int]
    tops: list[int] | None
    bottoms: list[int] | None
    ratios: list[float]

    @property
    def needs_spectrum(self) -> bool:
        """Whether any band (sweep or ratio) is evaluated, so the head's spectrum is needed."""
        return self.tops is not None or bool(self.ratios)

    def check_outputs(self, plot: bool, save_best: bool) -> None:
        """--plot needs a sweep, --save-best a band (sweep or ratio)."""
        if plot and self.tops is None:
            raise UsageError("--plot draws the sweep heatmap; add --sweep-top and/or --sweep-bottom")
        if save_best and not self.needs_spectrum:
            raise UsageError("--save-best saves the best band; add --sweep-top/--sweep-bottom or --ratio")


def parse_eval_request(
    no_background: bool,
    background_spec: str | None,
    abtt_list: str | None,
    whiten_list: str | None,
    filter_paths: Sequence[str],
    sweep_top: str | None,
    sweep_bottom: str | None,
    ratios: str | None,
) -> EvalRequest:
    """Parse eval's list options (raw option text; None when not given) into an `EvalRequest`."""
    from embfilter_cli.text.baselines import DEFAULT_ABTT, DEFAULT_WHITEN
    from embfilter_cli.text.evaluation import parse_float_list, parse_int_list

    if no_background and (background_spec or abtt_list or whiten_list):
        raise UsageError("--no-background cannot be combined with --background, --abtt or --whiten")
    abtt = parse_int_list(abtt_list, "--abtt") if abtt_list is not None else list(DEFAULT_ABTT)
    whiten = parse_int_list(whiten_list, "--whiten") if whiten_list is not None else list(DEFAULT_WHITEN)
    if 0 in whiten:
        raise UsageError(f"--whiten {whiten_list!r}: whitening needs at least 1 dimension")

    nothing_named = not filter_paths and sweep_top is None and sweep_bottom is None and ratios is None
    if nothing_named:
        sweep_top, sweep_bottom, ratios = DEFAULT_TOPS, DEFAULT_BOTTOMS, DEFAULT_RATIOS
    tops = parse_int_list(sweep_top, "--sweep-top") if sweep_top is not None else None
    bottoms = parse_int_list(sweep_bottom, "--sweep-bottom") if sweep_bottom is not None else None
    if (tops is None) != (bottoms is None):
        tops, bottoms = tops or [0], bottoms or [0]
    ratio_list = parse_float_list(ratios, "--ratio") if ratios is not None else []
    return EvalRequest(abtt, whiten, tops, bottoms, ratio_list)
