"""Output channels for the CLI: data on stdout, everything else on stderr.

rich's default Console and click.progressbar write to stdout, which would corrupt piped data, so
every human-facing message goes through `err_console`. Progress bars are shown only when stderr
is a terminal and the user did not pass -q.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console

from embfilter_cli.jsonable import json_default

T = TypeVar("T")

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Silence info messages and progress bars (warnings and errors still show)."""
    _state["quiet"] = quiet


def is_quiet() -> bool:
    """Whether -q is in effect."""
    return _state["quiet"]


def info(message: str) -> None:
    """A log line on stderr, hidden by -q."""
    if not _state["quiet"]:
        err_console.print(message)


def info_text(message: str) -> None:
    """`info` for text that is not rich markup (paths, shapes like [batch, 13])."""
    from rich.markup import escape

    info(escape(message))


def warn(message: str) -> None:
    """A warning on stderr; shown even with -q."""
    err_console.print(f"[yellow]Warning:[/yellow] {message}")


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False, default=json_default) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    """Whether progress bars should show: not quiet and stderr is a terminal."""
    return not _state["quiet"] and sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr when interactive, silently otherwise."""
    if not progress_enabled():
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, console=err_console, transient=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int, int], None] | None]:
    """A `(done, total)` callback that draws a transient bar on stderr; None when bars are off.

    Core functions take such a callback (`progress=`) and never import rich; the command wires
    this one in. The bar is removed when the block ends, errors included.
    """
    if not progress_enabled():
        yield None
        return
    from rich.progress import Progress

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, _total: bar.update(task, completed=done)
