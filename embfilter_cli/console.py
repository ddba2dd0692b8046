"""Output channels for the CLI: data on stdout, everything else on stderr, one function per kind.

| kind | function |
|---|---|
| text data on stdout (a line; many lines) | `out_text`, `out_lines` |
| binary data on stdout | `stdout_bytes()` (the stream to write to) |
| a table on stdout | `DataTable` + `print_table` (`key_value_table` for two-column summaries) |
| one JSON document on stdout | `emit_json` |
| progress on stderr | `progress_bar` (a context manager yielding the core's `progress=` callback) |
| info (a terminal or -v; hidden by -q), notices (hidden by -q) and warnings on stderr | `info`, `notice`, `warn` |

Errors are not printed here: they are raised and turned into `Error: …` lines by `cli.py`.

Markup-safe: rich would read `[red]` or `[batch, 13]` in a message as markup, so every string handed
to these functions is printed literally (as a `rich.text.Text`), paths and token text included.
Styling comes only from our own fixed words: `styled(text, style)` for a table cell, the `Warning:`
prefix. rich's default Console and click.progressbar write to stdout, which would corrupt piped
data, so every human-facing message goes through `err_console`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

from rich.console import Console
from rich.text import Text

from embfilter_cli.errors import printable
from embfilter_cli.jsonable import json_default

if TYPE_CHECKING:
    from rich.table import Table


def literal(text: str, style: str = "") -> Text:
    """`text` as a rich Text printed literally (no markup) with control characters escaped.

    Every string this module prints goes through here: model names, tensor names, tokens and
    paths come from files, and a terminal escape in them must show as `\\x1b`, not act
    (see `errors.printable`).
    """
    return Text(printable(text), style=style)


err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)

_state = {"quiet": False, "verbose": False}


def set_quiet(quiet: bool) -> None:
    """Silence info messages, notices and progress bars (warnings and errors still show)."""
    _state["quiet"] = quiet


def set_verbose(verbose: bool) -> None:
    """Show info messages even when stderr is not a terminal (a log file, a pipe, a CI job).

    Also the switch for other libraries' log lines (`library_logs`): off unless -v.
    """
    from embfilter_cli.library_logs import set_verbose as set_library_verbose

    _state["verbose"] = verbose
    set_library_verbose(verbose)


def is_quiet() -> bool:
    """Whether -q is in effect."""
    return _state["quiet"]


# --------------------------------------------------------------------------- stderr: info and warnings


def info_enabled() -> bool:
    """Whether `info` prints: not -q, and stderr is a terminal or -v was given.

    Info lines (what was loaded, what was saved) are for a person watching. When stderr goes to
    a pipe or a file, a script reads it, and a failure must be one `Error:` line there, not
    several lines of progress before it (progress bars follow the same rule). `-v` keeps them
    for a log file.
    """
    if _state["quiet"]:
        return False
    return _state["verbose"] or _stderr_is_terminal()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def info(message: str) -> None:
    """A log line on stderr, printed literally, for a person watching (see `info_enabled`)."""
    if info_enabled():
        err_console.print(literal(message))


def notice(message: str) -> None:
    """A line on stderr that explains a long wait or a disk write the user did not ask for
    (building the model cache); shown unless -q, terminal or not."""
    if not _state["quiet"]:
        err_console.print(literal(message))


def warn(message: str) -> None:
    """A warning on stderr (`Warning: ` then the message, literally); shown even with -q."""
    err_console.print(Text.assemble(("Warning:", "yellow"), " ", literal(message)))


# --------------------------------------------------------------------------- stdout: data


def out_text(line: str = "") -> None:
    """One line of text data on stdout (a newline is added)."""
    import click

    click.echo(printable(line))


def out_lines(lines: Iterable[str]) -> None:
    """Many lines of text data on stdout (each already ends in a newline), then flush."""
    sys.stdout.writelines(lines)
    sys.stdout.flush()


def stdout_bytes() -> IO[bytes]:
    """The byte stream under stdout, for binary data (.npy, safetensors) and bulk writers."""
    stdout: Any = sys.stdout  # a TextIO to the type checker; CliRunner and real terminals both give it .buffer
    return stdout.buffer if hasattr(stdout, "buffer") else stdout


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (numpy values become numbers/lists, other objects strings)."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False, default=json_default) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- stdout: tables


def styled(text: str, style: str | None) -> Text:
    """A table cell (or part of one) in one of our styles; the text itself stays literal."""
    return literal(text, style or "")


Cell = str | Text


@dataclass
class Column:
    """One column of a `DataTable`."""

    header: str = ""
    justify: Literal["left", "right", "center"] = "left"
    style: str | None = None


@dataclass
class DataTable:
    """A table for stdout. String cells are printed literally; use `styled` for our own styling."""

    columns: list[Column]
    title: str | None = None
    header: bool = True
    plain: bool = False  # no box and no edge padding: a two-column "key  value" summary
    rows: list[tuple[tuple[Cell, ...], str | None]] = field(default_factory=list)

    def add_row(self, *cells: Cell, style: str | None = None) -> None:
        """Append a row; `style` styles the whole row (e.g. "bold" for the best result)."""
        self.rows.append((cells, style))

    def to_rich(self) -> Table:
        """The rich Table that `print_table` renders."""
        from rich.table import Table

        options: dict[str, Any] = {"show_header": self.header}
        if self.title is not None:
            options.update(title=literal(self.title, "table.title"), title_justify="left")  # as rich styles a str title
        if self.plain:
            options.update(box=None, pad_edge=False)
        table = Table(**options)
        for col in self.columns:
            table.add_column(literal(col.header), justify=col.justify, style=col.style)
        for cells, style in self.rows:
            table.add_row(*(literal(c) if isinstance(c, str) else c for c in cells), style=style)
        return table


def key_value_table() -> DataTable:
    """The two-column summary `fit` and `verify` print: a bold key, then its value."""
    return DataTable([Column(style="bold"), Column()], header=False, plain=True)


def print_table(table: DataTable) -> None:
    """Print a table on stdout."""
    out_console.print(table.to_rich())


# --------------------------------------------------------------------------- stderr: progress


class Report(Protocol):
    """Progress callback handed to core functions: units done (and the total, if it changed)."""

    def __call__(self, done: float, total: float | None = None, /) -> None: ...


def progress_enabled() -> bool:
    """Whether progress bars are shown: stderr is a terminal and -q is off."""
    return not _state["quiet"] and _stderr_is_terminal()


@contextlib.contextmanager
def progress_bar(description: str, total: float | None = None, *, show: bool = True) -> Iterator[Report | None]:
    """A transient progress bar on stderr for the duration of the block.

    Yields `report(done, total=None)` to pass to a core function as its progress callback, or None
    when no bar is shown (-q, stderr not a terminal, or `show=False`, e.g. for inputs too small to
    need one). The bar is removed when the block ends, also on errors.
    """
    if not show or not progress_enabled():
        yield None
        return
    from rich.progress import Progress

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def report(done: float, total: float | None = None, /) -> None:
            if total is None:
                bar.update(task, completed=done)
            else:
                bar.update(task, completed=done, total=total)

        yield report
