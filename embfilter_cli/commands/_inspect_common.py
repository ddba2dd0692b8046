"""What the `embfilter inspect` subcommands share: model/filter/band options, loading, aligned tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from embfilter_cli.commands._options import FiniteFloat
from embfilter_cli.errors import UsageError
from embfilter_cli.text.directions import DEFAULT_RANK

F = TypeVar("F", bound=Callable[..., Any])

GROUP_LABELS = {"removed_top": "removed top", "kept": "kept", "removed_bottom": "removed bottom"}


def load_target(model: str | None, revision: str | None, filter_path: str | None, need_matrix: bool = True) -> Any:
    """`text.inspect_target.InspectTarget` with its log lines and warnings on the stderr console."""
    from embfilter_cli.console import info, warn
    from embfilter_cli.text.inspect_target import InspectTarget

    return InspectTarget(model, revision, filter_path, need_matrix=need_matrix, log=info, warn=warn)


def model_options(func: F) -> F:
    """`-m/--model` (default: the filter's model, else the built-in one) and `--revision`."""
    func = click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")(func)
    func = click.option(
        "-m",
        "--model",
        "model",
        default=None,
        metavar="SPEC",
        help="Alias, Hub id, model folder, .safetensors or .gguf file. Default: the filter's "
        "model, else the built-in SmolLM2-135M-Instruct GGUF.",
    )(func)
    return func


def filter_option(func: F) -> F:
    """`--filter FILTER`: an artifact fitted on the same model."""
    return click.option(
        "--filter",
        "filter_",
        default=None,
        type=click.Path(dir_okay=False),
        metavar="FILTER",
        help="A filter artifact from `embfilter fit` (must be fitted on the same model).",
    )(func)


def band_options(func: F) -> F:
    """The filter band when no --filter is given (same meaning as in `embfilter fit`)."""
    for name, kind, text in reversed(
        [
            (
                "--rank",
                click.IntRange(min=0),
                f"Remove the top R directions. [default: min({DEFAULT_RANK}, d/8) when no band is given]",
            ),
            ("--bottom", click.IntRange(min=0), "Also remove the lowest B directions."),
            ("--ratio", FiniteFloat(1.0), "The paper's preset: keep the central d // τ directions."),
            ("--start", click.IntRange(min=0), "Explicit window: first kept direction (0-based)."),
            (
                "--keep",
                click.IntRange(min=1),
                "Number of kept directions (with --start or --ratio, or alone: centred).",
            ),
        ]
    ):
        func = click.option(name, type=kind, default=None, help=text)(func)
    return func


def check_band_conflict(has_filter: bool, *band_values: Any) -> None:
    """A usage error, raised before anything is loaded, for a filter plus band options."""
    if has_filter and any(v is not None for v in band_values):
        raise UsageError("--filter already fixes the band; drop --rank/--bottom/--ratio/--start/--keep")


def band_for(
    hidden_size: int,
    artifact: Any,
    rank: int | None,
    bottom: int | None,
    ratio: float | None,
    start: int | None,
    keep: int | None,
) -> tuple[Any, str]:
    """The filter band (from the artifact or the band options) and where it came from."""
    from embfilter_cli.text.directions import choose_band

    check_band_conflict(artifact is not None, rank, bottom, ratio, start, keep)
    return choose_band(hidden_size, artifact, rank, bottom, ratio, start, keep)


def echo_table(rows: list[list[str]], right: frozenset[int] | set[int] = frozenset()) -> None:
    """Print aligned columns (display-width aware) on stdout."""
    from rich.cells import cell_len

    from embfilter_cli.console import out_text

    if not rows:
        return
    widths = [max(cell_len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        cells = []
        for c, cell in enumerate(row):
            pad = widths[c] - cell_len(cell)
            last = c == len(row) - 1
            cells.append(" " * pad + cell if c in right else (cell if last else cell + " " * pad))
        out_text("  ".join(cells).rstrip())


def band_text(band: dict[str, int]) -> str:
    """A band as one human line: what is removed at the top and bottom, and what is kept."""
    last = band["start"] + band["keep"] - 1
    return f"remove top {band['top']}, keep {band['start']}..{last} ({band['keep']}), remove bottom {band['bottom']}"
