"""Options shared by several subcommands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        from embfilter_cli.console import set_quiet

        set_quiet(True)
    return value


def output_options(func: F) -> F:
    """`--json` (one JSON document on stdout) and `-q` (no progress/info on stderr)."""
    func = click.option("--json", "json_", is_flag=True, help="Print one JSON document on stdout instead of a table.")(
        func
    )
    func = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=_set_quiet,
        is_eager=True,
        help="No progress bars or info lines on stderr.",
    )(func)
    return func


def force_option(func: F) -> F:
    return click.option("-f", "--force", is_flag=True, help="Overwrite an existing output file.")(func)


def model_cache_option(func: F) -> F:
    """`--no-cache`: load a GGUF model itself instead of its cached Hugging Face conversion."""
    return click.option(
        "--no-cache",
        is_flag=True,
        help="Load a GGUF model directly (about 45 s for the built-in one) instead of from its Hugging Face "
        "conversion, which is built once under $EMBFILTER_CACHE (default ~/.cache/embfilter) on first use.",
    )(func)


def device_option(func: F) -> F:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="cpu, cuda, cuda:N, mps or auto (cuda when available, else cpu).",
    )(func)
