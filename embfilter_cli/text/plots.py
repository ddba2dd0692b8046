"""Plots, written atomically: the spectrum of W_U with a band marked, and an eval sweep heatmap.

matplotlib is optional (`pip install 'embfilter[plot]'`): `require_matplotlib` fails early, before
any model work, with the install command. The Agg backend is used, so no display is needed.

Not handled: interactive windows, styles or sizes beyond the defaults here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embfilter_cli.errors import MissingDependencyError

if TYPE_CHECKING:
    from embfilter_cli.filters.band import Band
    from embfilter_cli.text.evaluation import SweepGrid

PLOT_FORMATS = ("png", "svg", "pdf")


def require_matplotlib() -> None:
    """Raise `MissingDependencyError` with the pip command when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "--plot needs matplotlib, which is not installed; run `pip install 'embfilter[plot]'` "
            "(or pip install matplotlib)"
        ) from None


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def save_spectrum_plot(sigma: Any, band: Band, path: str, title: str, force: bool) -> str:
    """σ against index on a log axis with the removed regions shaded; written atomically."""
    plt = _pyplot()
    import numpy as np

    from embfilter_cli.files import atomic_path

    sigma = np.asarray(sigma, dtype=np.float64)
    n = len(sigma)
    positive = np.clip(sigma, max(float(sigma.max()) * 1e-12, 1e-300), None)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    try:
        ax.semilogy(np.arange(n), positive, color="#1f4e79", lw=1.4, label="σ")
        if band.top:
            ax.axvspan(-0.5, band.start - 0.5, color="#d62728", alpha=0.18, label=f"removed top ({band.top})")
        if band.bottom:
            ax.axvspan(
                band.stop - 0.5,
                band.hidden_size - 0.5,
                color="#ff7f0e",
                alpha=0.25,
                label=f"removed bottom ({band.bottom})",
            )
        for edge in {band.start, band.stop} - {0, band.hidden_size}:
            ax.axvline(edge - 0.5, color="0.3", lw=0.8, ls="--")
        ax.set_xlim(-0.5, max(n, band.hidden_size) - 0.5)
        ax.set_xlabel("direction index (decreasing σ)")
        ax.set_ylabel("singular value σ (log scale)")
        ax.set_title(
            f"W_U spectrum: {title}\nkeep {band.start}..{band.stop - 1} ({band.keep} of {band.hidden_size})", fontsize=9
        )
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fmt = path.rsplit(".", 1)[-1].lower()
        with atomic_path(path, force=force) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
    return path


def save_sweep_heatmap(grid: SweepGrid, raw_score: float, path: str, force: bool, title: str) -> None:
    """Spearman per (top, bottom) band, centred on the raw score, best cell starred; written atomically."""
    plt = _pyplot()
    import numpy as np

    from embfilter_cli.files import atomic_path

    values = np.ma.masked_invalid(grid.spearman)
    fig, ax = plt.subplots(figsize=(1.1 * len(grid.bottom) + 2.5, 0.55 * len(grid.top) + 2))
    try:
        spread = float(np.nanmax(np.abs(grid.spearman - raw_score))) if np.isfinite(grid.spearman).any() else 0.01
        image = ax.imshow(values, cmap="RdYlGn", vmin=raw_score - spread, vmax=raw_score + spread, aspect="auto")
        best = (
            np.unravel_index(np.nanargmax(grid.spearman), grid.spearman.shape)
            if np.isfinite(grid.spearman).any()
            else None
        )
        for i in range(len(grid.top)):
            for j in range(len(grid.bottom)):
                value = grid.spearman[i, j]
                if math.isfinite(value):
                    mark = "★\n" if best is not None and (i, j) == tuple(best) else ""
                    ax.text(j, i, f"{mark}{value:.3f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(grid.bottom)), [str(b) for b in grid.bottom])
        ax.set_yticks(range(len(grid.top)), [str(t) for t in grid.top])
        ax.set_xlabel("bottom directions removed (B)")
        ax.set_ylabel("top directions removed (R)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label=f"Spearman (raw = {raw_score:.3f})")
        fig.tight_layout()
        with atomic_path(path, force=force) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=120)
    finally:
        plt.close(fig)
