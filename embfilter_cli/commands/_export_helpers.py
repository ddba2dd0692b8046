"""`embfilter export`'s helpers: flag checks (exit 2 before any work), default paths, the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from embfilter_cli.errors import UsageError


def check_model_flags(fmt: str | None, dense_only: bool, **model_flags: Any) -> bool:
    """True for a whole sentence-transformers model; refuse its flags elsewhere."""
    given = [f"--{name.replace('_', '-')}" for name, value in model_flags.items() if value is not None]
    if fmt != "sentence-transformers":
        if given or dense_only:
            raise UsageError(f"{(given or ['--dense-only'])[0]} applies to --format sentence-transformers only")
        return False
    if dense_only and given:
        raise UsageError(f"{given[0]} describes a whole model; --dense-only writes the Dense module alone")
    return not dense_only


def check_flags(
    onnx_flag: bool,
    fmt: str | None,
    append_to: str | None,
    host_output: str | None,
    filtered_name: str | None,
    normalize: bool,
    opset: int | None,
    fp16: bool,
    per_token: bool,
    external_data: bool | None,
) -> str:
    """Reject impossible flag combinations before any work; return the format."""
    if onnx_flag and fmt not in (None, "onnx"):
        raise UsageError(f"--onnx and --format {fmt} contradict each other; pass one of them")
    kind = "onnx" if onnx_flag else fmt
    if kind is None:
        raise UsageError("say what to export: --onnx, or --format sentence-transformers|npy|safetensors")
    if append_to is None:
        if host_output is not None:
            raise UsageError(
                "--output names the host output to filter and needs --append-to MODEL.onnx; the file to write is -o/--out"
            )
        if filtered_name is not None:
            raise UsageError("--filtered-name needs --append-to MODEL.onnx")
    if kind != "onnx":
        for flag, given in (
            ("--append-to", append_to),
            ("--opset", opset),
            ("--per-token", per_token),
            ("--external-data/--inline-data", external_data is not None),
        ):
            if given:
                raise UsageError(f"{flag} applies to --onnx only")
        if normalize:
            hint = (
                "add a sentence-transformers Normalize module after the Dense one"
                if kind == "sentence-transformers"
                else "a matrix cannot normalise; normalise after applying it (embfilter apply --normalize)"
            )
            raise UsageError(f"--normalize applies to --onnx and whole sentence-transformers models; {hint}")
        if fp16 and kind == "sentence-transformers":
            raise UsageError(
                "--fp16 is not available for sentence-transformers (a float16 Dense layer fails on float32 "
                "embeddings); convert the whole model with model.half() instead"
            )
    elif append_to is not None:
        if opset is not None:
            raise UsageError("--opset applies to standalone graphs; with --append-to the host's opset is kept")
        if fp16:
            raise UsageError(
                "--fp16 applies to standalone graphs; with --append-to the host output's dtype decides "
                "(a float16 output gets a float16 filtered output)"
            )
        if per_token:
            raise UsageError(
                "--per-token applies to standalone graphs; with --append-to a token-level host output "
                "is filtered per token automatically"
            )
    return kind


def check_opset(opset: int) -> None:
    """--opset must be one the installed onnx knows and the graphs support."""
    import onnx

    from embfilter_cli.export.onnx_graph import MIN_OPSET

    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise click.BadParameter(
            f"{opset} is outside {MIN_OPSET}..{latest} (the installed onnx's newest)", param_hint="--opset"
        )


def _default_out(kind: str, filter_path: Path, append_to: str | None, fp16: bool, whole: bool = False) -> Path:
    stem = filter_path.with_suffix("")
    half = ".fp16" if fp16 else ""
    if kind == "onnx":
        if append_to:
            host = Path(append_to)
            # next to the host, so its external data files resolve without links
            return host.with_name(f"{host.stem}.filtered.onnx")
        return Path(f"{stem}{half}.onnx")
    if kind == "npy":
        return Path(f"{stem}{half}.npy")
    if kind == "safetensors":
        return Path(f"{stem}.fp16.safetensors") if fp16 else Path(f"{stem}.export.safetensors")
    return Path(f"{stem}-st") if whole else Path(f"{stem}-st-dense")


def resolve_paths(
    filter_path: str | None, out: str | None, kind: str, append_to: str | None, fp16: bool, whole: bool, force: bool
) -> tuple[Path, Path]:
    """The filter (default: the newest artifact) and the output (default: named after it), checked writable."""
    from embfilter_cli.console import info
    from embfilter_cli.filters.artifact import newest_artifact

    if filter_path is None:
        path = newest_artifact()
        info(f"Using the newest filter in {path.parent}/: {path.name}")
    else:
        path = Path(filter_path)
    target = Path(out) if out else _default_out(kind, path, append_to, fp16, whole)
    if out is None:
        info(f"Writing {target}")
    _refuse_existing(kind, target, force, path, whole)  # before loading anything
    return path, target


def _refuse_existing(kind: str, target: Path, force: bool, filter_path: Path, whole: bool) -> None:
    if kind == "sentence-transformers" and whole:
        from embfilter_cli.export.st_model import _check_out

        _check_out(target, force, [filter_path])  # the model folder is checked once it is known
    elif kind == "sentence-transformers":
        from embfilter_cli.export.formats import _check_st_dir

        _check_st_dir(target, force, [filter_path])
    else:
        from embfilter_cli.files import check_writable

        check_writable(target, force)


def report(summary: dict[str, Any], kind: str, json_: bool) -> None:
    """The export summary: JSON on stdout, or lines on stderr with how to use the output."""
    from embfilter_cli.console import emit_json, info

    if json_:
        emit_json(summary)
        return
    dims = f"{summary['input_dim']} → {summary['output_dim']}"
    extra = ", normalised" if summary.get("normalize") else ""
    info(f"Wrote {summary['path']} ({summary['kind']}, {dims}, {summary['dtype']}{extra})")
    if summary.get("external_data"):
        info(f"Filter data: {summary['external_data']} (keep it next to the graph)")
    if kind == "onnx" and summary.get("unfiltered_output"):
        info(
            f"Outputs: {summary['filtered_output']!r} (filtered, output 0), {summary['unfiltered_output']!r} (unfiltered)"
        )
    if summary.get("apply"):  # a matrix export: say how to use it (a centred filter's mean included)
        info(f"Apply it as y = {summary['apply']}")
    if summary["checked"]:
        info(f"Check passed: max relative error {summary['max_rel_error']:.2e} ≤ {summary['bound']:g}")
    else:
        info("Not checked (--no-check)")
    if summary["kind"] == "sentence-transformers-model":
        info(
            f"Load it with SentenceTransformer({str(summary['path'])!r}); encode() gives `embfilter embed`'s vectors "
            + ("(the recipe is its default prompt)" if summary.get("prompt") else "")
        )
    elif kind == "sentence-transformers":
        info(
            f'Use it after pooling: add {{"idx": N, "name": "N", "path": "{Path(summary["path"]).name}", '
            '"type": "sentence_transformers.models.Dense"} to the model\'s modules.json (before any Normalize), '
            "or SentenceTransformer(modules=[*model, Dense.load(PATH)])"
        )
