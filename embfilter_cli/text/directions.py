"""Singular directions by index: band groups, --band selections, and what `inspect` reports on them.

Directions are indexed 0..d-1 by decreasing singular value. A band splits them into three groups
("removed_top", "kept", "removed_bottom"); `inspect directions` shows a selection of them and
summarises each group. `DirectionSource` gets the direction vectors from a filter artifact where
it stores them and from the exact spectrum of W_U otherwise; `sparkline`/`band_marks` draw the
spectrum as text.

The CLI imports this module at start-up (for `DEFAULT_RANK` in its help text), so numpy is
imported inside the functions that need it: `embfilter inspect --help` must stay light.

Not handled here: reading W_U or the vocabulary (`text/inspect_target.py`), and formatting (the `commands/inspect_*` modules);
the logit-lens arithmetic itself lives in `embfilter_cli.text.lens`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from embfilter_cli.errors import BandError
from embfilter_cli.filters.band import Band, resolve_band

if TYPE_CHECKING:
    import numpy as np
    import torch

    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.filters.spectral import Spectrum
    from embfilter_cli.text.lens import DirectionTokens
    from embfilter_cli.text.tokens import Vocabulary

DEFAULT_RANK = 64
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"

_SELECTION = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")


def default_rank(hidden_size: int) -> int:
    """The default band when none is given: remove the top min(64, d // 8) directions."""
    return max(1, min(DEFAULT_RANK, hidden_size // 8)) if hidden_size > 1 else 0


def choose_band(
    hidden_size: int,
    artifact: FilterArtifact | None,
    rank: int | None,
    bottom: int | None,
    ratio: float | None,
    start: int | None,
    keep: int | None,
) -> tuple[Band, str]:
    """The filter band and where it came from: "filter", "default" or "options".

    The caller rejects a filter combined with band options; here the artifact simply wins.
    """
    if artifact is not None:
        b = artifact.band
        return Band(int(b["hidden_size"]), int(b["start"]), int(b["keep"])), "filter"
    if all(v is None for v in (rank, bottom, ratio, start, keep)):
        # fit's default (top 64), shrunk for small models where 64 would remove most directions.
        return resolve_band(hidden_size, rank=default_rank(hidden_size)), "default"
    return resolve_band(hidden_size, rank=rank, bottom=bottom, ratio=ratio, start=start, keep=keep), "options"


def parse_selection(value: str) -> tuple[int | None, int | None]:
    """Parse --band START:STOP (half-open; either side may be empty) or a single index N."""
    text = value.strip()
    if text.isdigit():
        return int(text), int(text) + 1
    match = _SELECTION.match(text)
    if not match:
        raise BandError(
            f"--band {value!r} is not START:STOP (half-open, like 0:8 for directions 0..7) or a single index"
        )
    start = int(match.group(1)) if match.group(1) else None
    stop = int(match.group(2)) if match.group(2) else None
    if start is not None and stop is not None and stop <= start:
        raise BandError(f"--band {value} is empty: STOP must be greater than START (e.g. {start}:{start + 8})")
    return start, stop


def selection_indices(value: str, hidden_size: int) -> list[int]:
    """The direction indices named by --band for a model of `hidden_size`."""
    start, stop = parse_selection(value)
    start = 0 if start is None else start
    stop = hidden_size if stop is None else stop
    if start >= hidden_size or stop > hidden_size:
        raise BandError(
            f"--band {value} reaches direction {max(start, stop - 1)} but the model has {hidden_size} "
            f"(0..{hidden_size - 1}); use a STOP of at most {hidden_size}"
        )
    if stop <= start:
        raise BandError(f"--band {value} is empty for a hidden size of {hidden_size}")
    return list(range(start, stop))


def band_groups(band: Band) -> dict[str, list[int]]:
    """The direction indices of each group: removed top, kept, removed bottom (in that order)."""
    return {
        "removed_top": list(range(0, band.start)),
        "kept": list(range(band.start, band.stop)),
        "removed_bottom": list(range(band.stop, band.hidden_size)),
    }


def group_of(index: int, band: Band) -> str:
    """The group direction `index` belongs to."""
    if index < band.start:
        return "removed_top"
    return "kept" if index < band.stop else "removed_bottom"


def energy_removed(sigma: np.ndarray, band: Band) -> float:
    """Share of ‖W_U‖²_F in the removed directions, from a complete spectrum."""
    s2 = sigma**2
    return float((s2[: band.start].sum() + s2[band.stop :].sum()) / s2.sum()) if s2.sum() > 0 else 0.0


class DirectionSource:
    """Singular directions by index: from the artifact where it stores them, else the exact spectrum.

    `log` receives one line before the (slow) exact spectrum is computed.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        artifact: FilterArtifact | None,
        band: Band,
        log: Callable[[str], None] | None = None,
    ) -> None:
        import numpy as np

        self.matrix = matrix
        self.vectors: dict[int, np.ndarray] = {}
        self.sigmas: np.ndarray | None = None
        self._spectrum: Spectrum | None = None
        self._log = log
        if artifact is None:
            return
        removed = artifact.removed_directions
        removed_idx = list(range(band.start)) + list(range(band.stop, band.hidden_size))
        if removed.shape[0] == len(removed_idx):
            self.vectors.update({i: removed[r].astype(np.float64) for r, i in enumerate(removed_idx)})
        elif removed.shape[0] == band.start:  # randomized solver: only the top R are stored
            self.vectors.update({i: removed[i].astype(np.float64) for i in range(band.start)})
        kept_idx = artifact.kept_indices.tolist()
        if artifact.reduced and len(kept_idx) == artifact.output_dim:
            self.vectors.update({int(i): artifact.projection[r].astype(np.float64) for r, i in enumerate(kept_idx)})
        self.sigmas = np.asarray(artifact.singular_values, dtype=np.float64)

    def spectrum(self) -> Spectrum:
        """The exact spectrum of W_U, computed once."""
        if self._spectrum is None:
            from embfilter_cli.filters.solve import exact_spectrum_of

            self._spectrum = exact_spectrum_of(self.matrix, log=self._log or (lambda message: None))
        return self._spectrum

    def get(self, indices: list[int]) -> tuple[np.ndarray, list[float]]:
        """(len(indices), d) float32 directions and their singular values."""
        import numpy as np

        missing = [i for i in indices if i not in self.vectors]
        if missing or self.sigmas is None or len(self.sigmas) <= max(indices, default=0):
            spec = self.spectrum()
            for i in missing:
                self.vectors[i] = spec.vectors[:, i]
            if self.sigmas is None or len(self.sigmas) < len(spec.singular_values):
                self.sigmas = spec.singular_values
        d = self.matrix.shape[1]
        vecs = (
            np.stack([self.vectors[i] for i in indices]).astype(np.float32) if indices else np.zeros((0, d), np.float32)
        )
        return vecs, [float(self.sigmas[i]) for i in indices]


def token_entry(vocab: Vocabulary, token_id: int, value: float, zipf: Callable[[str], float] | None) -> dict[str, Any]:
    """One top token as reported: id, raw piece, printable text, logit and (with `zipf`) its Zipf value."""
    entry: dict[str, Any] = {
        "id": int(token_id),
        "token": vocab.piece(int(token_id)),
        "text": vocab.display(int(token_id)),
        "logit": round(float(value), 6),
    }
    if zipf is not None:
        word = vocab.word(int(token_id))
        entry["zipf"] = None if word is None else round(zipf(word), 2)
    return entry


def token_entries(
    vocab: Vocabulary, ids: Iterable[int], values: Iterable[float], zipf: Callable[[str], float] | None = None
) -> list[dict[str, Any]]:
    """`token_entry` for each (id, logit) pair."""
    return [token_entry(vocab, t, v, zipf) for t, v in zip(ids, values)]


def describe_directions(
    shown: Sequence[int],
    groups: dict[str, list[int]],
    used: dict[str, list[int]],
    needed: Sequence[int],
    sigmas: Sequence[float],
    toks: DirectionTokens,
    vocab: Vocabulary,
    zipf: Callable[[str], float] | None,
    band: Band,
    top: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The report of `inspect directions`: one entry per shown direction, one summary per band group.

    Args:
        shown: direction indices to list.
        groups: `band_groups(band)`.
        used: per group, the directions averaged in its summary.
        needed: the indices whose rows `sigmas` and `toks` (a `lens.DirectionTokens`) hold, in order.
        zipf: word → Zipf frequency, or None when word frequencies are unavailable.
    """
    from embfilter_cli.text.lens import summarize_directions, zipf_stats

    row_of = {idx: r for r, idx in enumerate(needed)}
    stats = {}
    if zipf is not None:
        for r in range(len(needed)):
            stats[r] = (
                zipf_stats(toks.positive.indices[r], vocab.word, zipf),
                zipf_stats(toks.negative.indices[r], vocab.word, zipf),
            )
    summary = []
    for name, idx in groups.items():
        if not idx:
            continue
        rows = [row_of[i] for i in used[name]]
        entry: dict[str, Any] = {
            "group": name,
            "first": idx[0],
            "last": idx[-1],
            "directions": len(idx),
            "directions_used": len(rows),
        }
        if zipf is not None:
            entry.update(summarize_directions([stats[r] for r in rows]))
        else:
            entry.update(
                {"tokens": 2 * top * len(rows), "words": None, "mean_zipf": None, "mean_zipf_frequent_sign": None}
            )
        summary.append(entry)
    shown_entries = []
    for i in shown:
        r = row_of[i]
        pos_stats, neg_stats = stats.get(r, (None, None))
        shown_entries.append(
            {
                "index": i,
                "sigma": float(sigmas[r]),
                "group": group_of(i, band),
                "zipf_positive": None
                if pos_stats is None or pos_stats.mean_zipf is None
                else round(pos_stats.mean_zipf, 4),
                "zipf_negative": None
                if neg_stats is None or neg_stats.mean_zipf is None
                else round(neg_stats.mean_zipf, 4),
                "positive": token_entries(vocab, toks.positive.indices[r], toks.positive.values[r], zipf),
                "negative": token_entries(vocab, toks.negative.indices[r], toks.negative.values[r], zipf),
            }
        )
    return shown_entries, summary


def sparkline(values: np.ndarray, width: int) -> tuple[str, list[tuple[int, int]]]:
    """A log-scale sparkline of positive values in at most `width` columns.

    Returns the line and, per column, the (first, last) value index it covers. Each column shows
    the geometric mean of its values; the 8 block heights span the log range linearly.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return "", []
    floor = max(float(v.max()) * 1e-12, np.finfo(np.float64).tiny)  # rank-deficient heads have σ = 0
    logs = np.log(np.clip(v, floor, None))
    cols = min(width, v.size)
    edges = np.linspace(0, v.size, cols + 1).round().astype(int)
    spans = [(int(edges[c]), int(edges[c + 1]) - 1) for c in range(cols)]
    col_vals = np.array([logs[a : b + 1].mean() for a, b in spans])
    lo, hi = float(col_vals.min()), float(col_vals.max())
    if hi - lo < 1e-12:
        levels = np.full(cols, 3)
    else:
        levels = np.clip(np.round((col_vals - lo) / (hi - lo) * 7), 0, 7).astype(int)
    return "".join(SPARK_BLOCKS[i] for i in levels), spans


def band_marks(spans: list[tuple[int, int]], band: Band) -> str:
    """Under each sparkline column: `─` all kept, `×` all removed, `┼` a band edge inside it."""
    marks = []
    for a, b in spans:
        removed = [i < band.start or i >= band.stop for i in range(a, b + 1)]
        marks.append("×" if all(removed) else ("─" if not any(removed) else "┼"))
    return "".join(marks)
