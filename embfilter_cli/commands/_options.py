"""Options shared by several subcommands."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class FiniteFloat(click.ParamType):
    """A finite float in a range, checked when the command line is parsed (so `nan`, `inf` and
    out-of-range values are usage errors, exit 2, before any model is loaded)."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """The checked float; anything else is click's usage error naming the option."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            self.fail(f"{value} must be {'>' if self.low_open else '>='} {self.low:g}", param, ctx)
        if self.high is not None and number > self.high:
            self.fail(f"{value} must be <= {self.high:g}", param, ctx)
        return number


# Seeds seed torch's and numpy's generators, which take unsigned 64-bit values.
SEED = click.IntRange(0, 2**64 - 1)
# Rows or texts held in memory at once: beyond these the allocation alone is absurd.
MAX_VECTOR_BATCH = 1 << 22
MAX_TEXT_BATCH = 1 << 16


def _console_switch(short: str, long: str, setter: str, help_text: str) -> Callable[[F], F]:
    """An eager flag that turns a console setting on (`console.set_quiet` / `set_verbose`) while parsing."""

    def switch_on(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            from embfilter_cli import console

            getattr(console, setter)(True)
        return value

    return click.option(
        short, long, is_flag=True, expose_value=False, callback=switch_on, is_eager=True, help=help_text
    )


def output_options(func: F) -> F:
    """`--json` (one JSON document on stdout), `-q` (no progress/info on stderr) and `-v` (info lines
    even when stderr is not a terminal)."""
    func = click.option("--json", "json_", is_flag=True, help="Print one JSON document on stdout instead of a table.")(
        func
    )
    func = _console_switch("-q", "--quiet", "set_quiet", "No progress bars or info lines on stderr.")(func)
    func = _console_switch(
        "-v", "--verbose", "set_verbose", "Info lines on stderr even when it is not a terminal (a log file, a pipe)."
    )(func)
    return func


def force_option(func: F) -> F:
    """`-f/--force`: overwrite an existing output file."""
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
    """`--device`: cpu, cuda, cuda:N, mps or auto."""
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="cpu, cuda, cuda:N, mps or auto (cuda when available, else cpu).",
    )(func)


# ---------------------------------------------------------------- how texts are embedded
# `embed` defines these; `fit --center-on` and `center` embed background texts with the same
# options and defaults, so a mean is made exactly the way the vectors it centres are.


def pooling_option(func: F) -> F:
    """`--pooling`: mean or last-token pooling."""
    return click.option(
        "--pooling",
        type=click.Choice(["mean", "last"]),
        default="mean",
        show_default=True,
        help="mean over tokens (echo: over the second copy), or the last token (left padding).",
    )(func)


def recipe_option(func: F) -> F:
    """`--recipe`: a named prompt recipe or a custom template containing {text}."""
    return click.option(
        "--recipe",
        default="none",
        show_default=True,
        metavar="NAME|TEMPLATE",
        help="none, prompteol, summarize, echo, or a custom template containing {text}.",
    )(func)


def batch_size_option(func: F) -> F:
    """`--batch-size`: texts per forward pass."""
    return click.option(
        "--batch-size",
        type=click.IntRange(1, MAX_TEXT_BATCH),
        default=16,
        show_default=True,
        help="Texts per forward pass.",
    )(func)


def max_length_option(func: F) -> F:
    """`--max-length`: the token budget per prompt, template included."""
    return click.option(
        "--max-length",
        type=click.IntRange(min=1),
        default=512,
        show_default=True,
        help="Token budget per prompt, template included; longer texts are cut, the template is kept.",
    )(func)


def dtype_option(func: F) -> F:
    """`--dtype`: the model weights' dtype (auto, float32, bfloat16, float16)."""
    return click.option(
        "--dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default="auto",
        show_default=True,
        help="Model weights dtype; auto = float32 on CPU, bfloat16 on CUDA.",
    )(func)


def input_format_option(func: F) -> F:
    """`--input-format`: how to read the texts (auto, lines, jsonl)."""
    return click.option(
        "--input-format",
        type=click.Choice(["auto", "lines", "jsonl"]),
        default="auto",
        show_default=True,
        help="auto: JSONL for .jsonl files or input whose first line starts with '{', else one text per line.",
    )(func)


def embedding_options(func: F) -> F:
    """--pooling, --recipe, --batch-size, --max-length, --dtype and --input-format, as `embed` has them."""
    for option in (input_format_option, dtype_option, max_length_option, batch_size_option, recipe_option):
        func = option(func)
    return pooling_option(func)


def engine_options(func: F) -> F:
    """`--engine local|ray`, `--ray-address`, `--concurrency` (Parquet jobs of `apply` and `embed`)."""
    func = click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=None,
        help="--engine ray: actors (one GPU each with --device cuda) [default: the CPUs, at most one per file].",
    )(func)
    func = click.option(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="--engine ray: join this cluster (`auto` for the running one) [default: start a local Ray].",
    )(func)
    func = click.option(
        "--engine",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Parquet/Arrow files: run here, or on Ray Data actors (pip install 'embfilter[ray]').",
    )(func)
    return func


def output_column_option(func: F) -> F:
    """`--output-column`: the vectors' column (Parquet, Arrow) or field (JSONL) in an output of `embed`."""

    def named(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        # An empty name would fall back to `embedding` while counting as chosen, i.e. replace it unasked.
        if value is not None and not value:
            raise click.BadParameter("needs a name", ctx=ctx, param=param)
        return value

    return click.option(
        "--output-column",
        default=None,
        callback=named,
        metavar="NAME",
        help="Parquet/Arrow column or JSONL field for the vectors [default: embedding; an input column or "
        "field of that name is refused]. Naming an existing one here replaces it.",
    )(func)


def self_option(func: F) -> F:
    """`eval --center-self`: rows centred on the model's own samples."""
    help_text = "Also score each filter and band centred on texts the model samples itself (as `fit --center-on self`)."
    return click.option("--center-self", is_flag=True, help=help_text)(func)
