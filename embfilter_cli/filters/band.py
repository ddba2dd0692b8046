"""Which singular directions a filter keeps: band arithmetic, nothing else.

Directions are indexed 0..d-1 by decreasing singular value. A band keeps one contiguous window
[start, start + keep); the `start` directions above it ("top", the frequency-writing subspace)
and the `d - start - keep` below it ("bottom") are removed. Every user-facing way of naming a
band (--rank/--bottom, --ratio, --start/--keep) maps onto that one window.

Not handled here: choosing a band from data or from the spectrum (see `auto_band`'s caller and
`embfilter eval`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from embfilter_cli.errors import BandError


@dataclass(frozen=True)
class Band:
    """A contiguous window of kept directions out of `hidden_size`."""

    hidden_size: int
    start: int
    keep: int

    def __post_init__(self) -> None:
        d, s, k = self.hidden_size, self.start, self.keep
        if d <= 0:
            raise BandError(f"hidden size must be positive, got {d}")
        if s < 0 or k <= 0 or s + k > d:
            raise BandError(
                f"band keeps directions {s}..{s + k - 1} but the model has {d} (0..{d - 1}); "
                "the kept window must be non-empty and inside the spectrum"
            )

    @property
    def top(self) -> int:
        """Number of removed leading (largest-σ) directions."""
        return self.start

    @property
    def bottom(self) -> int:
        """Number of removed trailing (smallest-σ) directions."""
        return self.hidden_size - self.start - self.keep

    @property
    def stop(self) -> int:
        """One past the last kept direction."""
        return self.start + self.keep

    def kept_indices(self) -> list[int]:
        """The kept direction indices, in order."""
        return list(range(self.start, self.stop))

    def removed_indices(self) -> list[int]:
        """The removed direction indices: the top ones, then the bottom ones."""
        return list(range(0, self.start)) + list(range(self.stop, self.hidden_size))

    def label(self) -> str:
        """Short tag used in default artifact names, e.g. `r64-b16`."""
        return f"r{self.top}-b{self.bottom}"

    def as_dict(self) -> dict[str, int]:
        """The band as a JSON-ready dict (hidden_size, start, keep, top, bottom)."""
        return {
            "hidden_size": self.hidden_size,
            "start": self.start,
            "keep": self.keep,
            "top": self.top,
            "bottom": self.bottom,
        }


def band_from_rank(hidden_size: int, rank: int, bottom: int = 0) -> Band:
    """Remove the top `rank` and the bottom `bottom` directions."""
    if rank < 0 or bottom < 0:
        raise BandError(f"--rank and --bottom must be >= 0, got rank={rank}, bottom={bottom}")
    if rank + bottom >= hidden_size:
        raise BandError(
            f"--rank {rank} + --bottom {bottom} = {rank + bottom} removes every direction of a "
            f"hidden size of {hidden_size}; keep the sum below {hidden_size}"
        )
    return Band(hidden_size, rank, hidden_size - rank - bottom)


def band_from_ratio(hidden_size: int, ratio: float) -> Band:
    """The paper's symmetric preset: keep the central d // τ directions."""
    if ratio < 1:
        raise BandError(f"--ratio must be >= 1 (1 keeps everything), got {ratio}")
    keep = int(hidden_size // ratio)
    if keep < 1:
        raise BandError(f"--ratio {ratio} keeps {keep} of {hidden_size} directions; use a smaller ratio")
    return Band(hidden_size, (hidden_size - keep) // 2, keep)


def band_from_window(hidden_size: int, start: int, keep: int | None) -> Band:
    """An explicit window: keep directions start..start+keep-1 (keep defaults to the rest)."""
    if start < 0:
        raise BandError(f"--start must be >= 0, got {start}")
    if keep is None:
        keep = hidden_size - start
    if keep > hidden_size:
        raise BandError(f"--keep {keep} is larger than the hidden size {hidden_size}")
    return Band(hidden_size, start, keep)


def resolve_band(
    hidden_size: int,
    *,
    rank: int | None = None,
    bottom: int | None = None,
    ratio: float | None = None,
    start: int | None = None,
    keep: int | None = None,
) -> Band:
    """Turn the CLI's band options into a Band, rejecting conflicting combinations."""
    by_rank = rank is not None or bottom is not None
    by_ratio = ratio is not None
    by_window = start is not None
    if by_ratio and (by_rank or by_window):
        raise BandError("--ratio cannot be combined with --rank/--bottom/--start; pick one way to name the band")
    if (by_window or keep is not None) and by_rank:
        raise BandError("--start/--keep cannot be combined with --rank/--bottom; pick one way to name the band")
    if ratio is not None:
        if not math.isfinite(ratio):
            raise BandError(f"--ratio must be a finite number >= 1, got {ratio}")
        if keep is not None and keep != int(hidden_size // ratio):
            raise BandError(f"--ratio {ratio} keeps {int(hidden_size // ratio)} directions but --keep says {keep}")
        return band_from_ratio(hidden_size, ratio)
    if by_window:
        return band_from_window(hidden_size, start, keep)  # type: ignore[arg-type]
    if keep is not None:
        # --keep alone: the paper's centred window of that width.
        if keep > hidden_size or keep < 1:
            raise BandError(f"--keep {keep} must be between 1 and the hidden size {hidden_size}")
        return Band(hidden_size, (hidden_size - keep) // 2, keep)
    return band_from_rank(hidden_size, rank or 0, bottom or 0)
