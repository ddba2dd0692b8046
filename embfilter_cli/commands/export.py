"""`embfilter export`: the filter as ONNX (standalone or appended to a model), a sentence-transformers
Dense folder, a .npy matrix or safetensors — each checked numerically before success is reported."""

from __future__ import annotations

import click

from embfilter_cli.commands._options import force_option, model_cache_option, output_options
from embfilter_cli.errors import UsageError

FORMATS = ("onnx", "sentence-transformers", "npy", "safetensors")


@click.command()
@click.argument("filter_path", metavar="[FILTER]", required=False, default=None)
@click.option("--onnx", "onnx_flag", is_flag=True, help="Shorthand for --format onnx.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="What to write: an ONNX graph, a sentence-transformers model (or with --dense-only its Dense "
    "module alone), the matrix P as .npy, or safetensors (the artifact again, or with --fp16 a float16 "
    "deployment file).",
)
@click.option(
    "-o",
    "--out",
    "out",
    default=None,
    metavar="PATH",
    help="Output file (a folder for sentence-transformers). [default: beside FILTER, or "
    "<host>.filtered.onnx beside the --append-to model]",
)
@click.option(
    "--append-to",
    "append_to",
    default=None,
    metavar="MODEL.onnx",
    help="Add the filter after an output of this ONNX embedding model instead of writing a standalone graph.",
)
@click.option(
    "--output",
    "host_output",
    default=None,
    metavar="NAME",
    help="With --append-to: the host output to filter. [default: sentence_embedding, else the only "
    "pooled (rank-2) output, else the only output]",
)
@click.option(
    "--filtered-name",
    default=None,
    metavar="NAME",
    help="With --append-to: name the filtered output NAME and leave the host output as it is. "
    "[default: the filtered output takes the host output's name; the original becomes NAME_unfiltered]",
)
@click.option(
    "--normalize",
    is_flag=True,
    help="ONNX: L2-normalise the filtered vectors (zero vectors stay zero); sentence-transformers: add a "
    "Normalize module.",
)
@click.option(
    "-m",
    "--model",
    default=None,
    metavar="SPEC",
    help="sentence-transformers: the model to wrap (alias, Hub id, folder or .gguf). [default: the filter's "
    "own model when it is here]",
)
@click.option("--revision", default=None, help="sentence-transformers: Hub revision for a Hub id.")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "last"]),
    default=None,
    help="sentence-transformers: pooling, as `embed --pooling`. [default: mean]",
)
@click.option(
    "--recipe",
    default=None,
    metavar="NAME|TEMPLATE",
    help="sentence-transformers: a prefix template like 'Query: {text}', saved as the model's default prompt "
    "(templates with text after {text} cannot be). [default: none]",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=None,
    help="sentence-transformers: max_seq_length in tokens, as `embed --max-length`. [default: 512]",
)
@click.option(
    "--dense-only",
    is_flag=True,
    help="sentence-transformers: write only the filter's Dense module folder, to add to a model yourself.",
)
@click.option("--opset", type=int, default=None, help="Standalone ONNX: the ai.onnx opset. [default: 17]")
@click.option(
    "--fp16",
    is_flag=True,
    help="Half precision: a float16 standalone ONNX graph, or a float16 .npy / safetensors deployment file.",
)
@click.option(
    "--per-token",
    is_flag=True,
    help="Standalone ONNX: input [batch, seq, d] → [batch, seq, k] instead of [batch, d] → [batch, k].",
)
@click.option(
    "--external-data/--inline-data",
    "external_data",
    default=None,
    help="ONNX: store the filter in its own data file (<output>.data) next to the output. [default: "
    "when the graph would pass protobuf's 2 GB limit, or the host keeps its weights in external "
    "files and the filter is over 1 MiB]",
)
@click.option("--no-check", is_flag=True, help="Skip the structural and numerical checks of what was written.")
@model_cache_option
@force_option
@output_options
def export(
    filter_path: str | None,
    onnx_flag: bool,
    fmt: str | None,
    out: str | None,
    append_to: str | None,
    host_output: str | None,
    filtered_name: str | None,
    normalize: bool,
    model: str | None,
    revision: str | None,
    pooling: str | None,
    recipe: str | None,
    max_length: int | None,
    dense_only: bool,
    opset: int | None,
    fp16: bool,
    per_token: bool,
    external_data: bool | None,
    no_check: bool,
    no_cache: bool,
    force: bool,
    json_: bool,
) -> None:
    """Export a filter where embeddings are made: ONNX, sentence-transformers, npy or safetensors.

    FILTER is an artifact from `embfilter fit` (default: the newest one in ./artifacts).
    Every export is checked before it is reported (onnx.checker and onnxruntime, or the
    sentence-transformers loader, against the float64 filter); a failed check leaves no file.

    \b
    Examples:
      embfilter export artifacts/qwen2-7b-r256.safetensors --onnx -o filter.onnx
      embfilter export F --onnx --append-to model.onnx -o model.filtered.onnx
      embfilter export F --onnx --append-to model.onnx --output sentence_embedding --normalize
      embfilter export F --format sentence-transformers --model smollm2-135m --pooling mean -o smol-filtered/
      embfilter export F --format sentence-transformers --dense-only -o my-st-model/2_Dense
      embfilter export F --format npy -o P.npy
      embfilter export --onnx                    # newest artifact in ./artifacts
    """
    from embfilter_cli.commands import _export_helpers as helpers

    whole = helpers.check_model_flags(
        fmt, dense_only, model=model, revision=revision, pooling=pooling, recipe=recipe, max_length=max_length
    )
    if no_cache and not whole:
        raise UsageError("--no-cache applies to a whole sentence-transformers model (a GGUF model's conversion)")
    kind = helpers.check_flags(
        onnx_flag,
        fmt,
        append_to,
        host_output,
        filtered_name,
        normalize and not whole,
        opset,
        fp16,
        per_token,
        external_data,
    )
    if kind == "onnx" and opset is not None:
        helpers.check_opset(opset)

    from embfilter_cli.api.exporting import ExportOptions, export_filter
    from embfilter_cli.commands._hooks import console_hooks
    from embfilter_cli.filters.artifact import load_artifact

    path, target = helpers.resolve_paths(filter_path, out, kind, append_to, fp16, whole, force)
    options = ExportOptions(
        normalize=normalize,
        check=not no_check,
        force=force,
        append_to=append_to,
        host_output=host_output,
        filtered_name=filtered_name,
        opset=opset,
        fp16=fp16,
        per_token=per_token,
        external_data=external_data,
        whole=whole,
        model=model,
        revision=revision,
        pooling=pooling or "mean",
        recipe=recipe or "none",
        max_length=max_length or 512,
        no_cache=no_cache,
    )
    result = export_filter(load_artifact(path), kind, target, options, console_hooks())
    summary = {"filter": str(path), **result.summary()}
    helpers.report(summary, kind, json_)
