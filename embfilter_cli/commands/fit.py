"""`embfilter fit`: find the model, read only W_U, decompose it, save the filter."""

from __future__ import annotations

import click

from embfilter_cli.commands._options import (
    SEED,
    FiniteFloat,
    device_option,
    embedding_options,
    force_option,
    output_options,
)
from embfilter_cli.commands._self_options import self_sampling_of, self_sampling_options
from embfilter_cli.filters.solve import AUTO_EXACT_MAX_HIDDEN


@click.command()
@click.option(
    "-m",
    "--model",
    "model",
    default=None,
    metavar="SPEC",
    help="Alias (see `embfilter models`), Hub id, model folder, .safetensors or .gguf file. "
    "Default: the built-in SmolLM2-135M-Instruct GGUF.",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option(
    "--tensor", "tensor_name", default=None, metavar="NAME", help="Use this tensor as W_U instead of guessing."
)
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    default=None,
    help="Remove the top R directions. [default: no band option means --band auto; 64 with --solver randomized]",
)
@click.option("--bottom", type=click.IntRange(min=0), default=None, help="Also remove the lowest B directions.")
@click.option(
    "--ratio", type=FiniteFloat(1.0), default=None, help="The paper's preset: keep the central d // τ directions."
)
@click.option(
    "--start", type=click.IntRange(min=0), default=None, help="Explicit window: first kept direction (0-based)."
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="Number of kept directions (with --start or --ratio, or alone: centred).",
)
@click.option(
    "--band",
    "band_rule",
    type=click.Choice(["auto"]),
    default=None,
    help="auto (the default when no band option is given): the top R and bottom B from the spectrum alone "
    "(σ above the log-linear bulk's ceiling; σ under half the bulk trend; see embfilter_cli/filters/band_auto.py). "
    "Exact or refined solver.",
)
@click.option(
    "--reduce/--no-reduce",
    default=True,
    show_default=True,
    help="Save the k×d reduced map P, or the d×d projector I − V_e V_eᵀ.",
)
@click.option(
    "--solver",
    type=click.Choice(["auto", "exact", "refined", "randomized"]),
    default="auto",
    show_default=True,
    help="refined: float32 Gram, removed directions refined and certified in float64 (falls back to exact if "
    f"the certificate fails). auto = refined for a narrow named band on a big head on the CPU, else exact; randomized beyond d = {AUTO_EXACT_MAX_HIDDEN}.",
)
@device_option
@click.option(
    "--oversample",
    type=click.IntRange(min=0),
    default=None,
    help="Randomized: extra subspace columns [default: max(16, R/2)].",
)
@click.option(
    "--power-iters",
    default="auto",
    show_default=True,
    help="Randomized: passes over W_U, or 'auto' to iterate until --tol is certified.",
)
@click.option(
    "--tol",
    type=FiniteFloat(0.0, 1.0, low_open=True),
    default=1e-3,
    show_default=True,
    help="Randomized: max ‖Gv − σ²v‖/σ² allowed over the returned directions.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Randomized: RNG seed.")
@click.option(
    "--precision",
    type=click.Choice(["float64", "float32"]),
    default="float64",
    show_default=True,
    help="Exact: float64 Gram (float64-accurate), or float32 chunk Grams summed in float64 "
    "(about 2x faster on CPUs, float32-accurate).",
)
@click.option(
    "--padding-rows",
    type=click.Choice(["drop", "keep"]),
    default="drop",
    show_default=True,
    help="Rows past the tokenizer's vocabulary (never-emitted padding) are dropped by default: "
    "they are untrained and would distort the spectrum.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Artifact path [default: artifacts/<model>-<band>.safetensors].",
)
@click.option(
    "--center-on",
    "center_on",
    default=None,
    metavar="TEXTS|self|none",
    help="Also centre (y = P·x − m, m the mean of the filtered TEXTS: unlabeled texts from your domain as `embed` "
    "reads them, or -, or a .npy of raw embeddings; embedded with this model and --pooling/--recipe/--max-length/"
    "--batch-size/--dtype below). self: texts the model samples itself (--self-*). none (default): W_U only.",
)
@embedding_options
@self_sampling_options
@force_option
@output_options
def fit(
    model: str | None,
    revision: str | None,
    tensor_name: str | None,
    rank: int | None,
    bottom: int | None,
    ratio: float | None,
    start: int | None,
    keep: int | None,
    band_rule: str | None,
    reduce: bool,
    solver: str,
    device: str,
    oversample: int | None,
    power_iters: str,
    tol: float,
    seed: int,
    precision: str,
    padding_rows: str,
    output: str | None,
    center_on: str | None,
    pooling: str,
    recipe: str,
    batch_size: int,
    max_length: int,
    dtype: str,
    input_format: str,
    force: bool,
    json_: bool,
    **self_opts: object,  # --self-* and --save-texts (`_self_options.self_sampling_options`)
) -> None:
    """Fit a filter on a model's unembedding matrix and save it as a safetensors artifact.

    \b
    Examples:
      embfilter fit                                  # built-in SmolLM2-135M, --band auto
      embfilter fit --model qwen2-7b --rank 256
      embfilter fit --model ./my-llama --rank 64 --bottom 16 -o artifacts/my-llama.safetensors
      embfilter fit --model Qwen/Qwen2.5-0.5B --ratio 2
      embfilter fit --band auto                      # R and B from the spectrum alone
      embfilter fit --model model.gguf --rank 64 --solver randomized --device cuda --json
      embfilter fit --rank 64 --bottom 16 --center-on background.txt   # y = P·x − m (see `embfilter center`)
      embfilter fit --center-on self                 # centred on the model's own samples, no data needed
    """
    from embfilter_cli.api.fitting import FitSettings, fit_filter
    from embfilter_cli.commands._fit_helpers import parse_power_iters, print_summary
    from embfilter_cli.commands._hooks import console_hooks

    settings = FitSettings(
        model=model,
        revision=revision,
        tensor=tensor_name,
        rank=rank,
        bottom=bottom,
        ratio=ratio,
        start=start,
        keep=keep,
        band=band_rule,
        reduce=reduce,
        solver=solver,
        device=device,
        oversample=oversample,
        power_iters=parse_power_iters(power_iters),
        tol=tol,
        seed=seed,
        precision=precision,
        padding_rows=padding_rows,
        center_on=center_on,
        pooling=pooling,
        recipe=recipe,
        batch_size=batch_size,
        max_length=max_length,
        dtype=dtype,
        input_format=input_format,
        self_sampling=self_sampling_of(self_opts),
        save_texts=self_opts["save_texts"],  # type: ignore[arg-type]
    )
    result = fit_filter(settings, output=output, save=True, force=force, hooks=console_hooks())
    summary = result.summary()
    if json_:
        from embfilter_cli.console import emit_json

        emit_json(summary)
    else:
        print_summary(summary)
