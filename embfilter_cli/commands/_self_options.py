"""The options of `--center-on self`: how the model samples its own background."""

from __future__ import annotations

from typing import Any

import click

from embfilter_cli.commands._options import SEED, F, FiniteFloat


def self_sampling_options(func: F) -> F:
    """How `--center-on self` samples the model's own texts, and `--save-texts` to keep them."""
    from embfilter_cli.text.self_samples import SelfSampling

    default = SelfSampling()
    func = click.option(
        "--save-texts",
        default=None,
        type=click.Path(dir_okay=False),
        metavar="FILE.jsonl",
        help="--center-on self: also write the sampled texts as JSONL (pass them to --center-on FILE later).",
    )(func)
    func = click.option(
        "--self-start",
        default=default.start,
        show_default=True,
        metavar="bos|TEXT",
        help="--center-on self: every sample continues the BOS token, or this text.",
    )(func)
    func = click.option(
        "--self-seed", type=SEED, default=default.seed, show_default=True, help="--center-on self: sampling seed."
    )(func)
    func = click.option(
        "--self-temperature",
        type=FiniteFloat(0.0, low_open=True),
        default=default.temperature,
        show_default=True,
        help="--center-on self: softmax temperature (1 = the model's own distribution).",
    )(func)
    func = click.option(
        "--self-tokens",
        type=click.IntRange(min=1),
        default=default.new_tokens,
        show_default=True,
        help="--center-on self: new tokens per sample.",
    )(func)
    return click.option(
        "--self-count",
        type=click.IntRange(min=1),
        default=default.count,
        show_default=True,
        help="--center-on self: number of samples.",
    )(func)


def self_sampling_of(opts: dict[str, Any]) -> Any:
    """The `SelfSampling` that `self_sampling_options`' values describe."""
    from embfilter_cli.text.self_samples import SelfSampling

    return SelfSampling(
        *(opts[k] for k in ("self_count", "self_tokens", "self_temperature", "self_seed", "self_start"))
    )
