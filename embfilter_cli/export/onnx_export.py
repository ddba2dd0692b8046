"""The filter as ONNX: write a standalone filter graph, or the filter appended to a host graph.

Pure core (no click, no printing). Each export is built (`onnx_graph`, `onnx_host`), given external
data files where needed (`onnx_data`), written atomically, and checked before it is renamed into
place (`onnx_check`): a failed check leaves no file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from embfilter_cli.export.onnx_check import check_appended, check_or_blame_host, check_standalone, run_checker
from embfilter_cli.export.onnx_data import (
    external_locations,
    externalize_initializer,
    filter_data_path,
    link_host_data,
    needs_external,
    save_model,
    side_files,
)
from embfilter_cli.export.onnx_graph import (
    DEFAULT_OPSET,
    STANDALONE_INPUT,
    STANDALONE_OUTPUT,
    build_standalone,
    dtype_name,
)
from embfilter_cli.export.onnx_host import append_filter, load_host, value_info_desc
from embfilter_cli.export.report import CheckReport, ExportResult
from embfilter_cli.files import atomic_path, check_writable, parents_made

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact


def export_standalone(
    artifact: FilterArtifact,
    out: str | os.PathLike[str],
    *,
    normalize: bool = False,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    per_token: bool = False,
    check: bool = True,
    force: bool = False,
    external_data: bool | None = None,
) -> ExportResult:
    """Build, write (atomically) and check a standalone filter graph."""
    out = check_writable(out, force)
    model = build_standalone(artifact, normalize=normalize, opset=opset, fp16=fp16, per_token=per_token)
    externalize = needs_external(model, 0) if external_data is None else external_data
    data_path = filter_data_path(out, reserved=set()) if externalize else None
    if data_path is not None:
        check_writable(data_path, force)
    report: CheckReport | None = None
    # Folders outlive the inner blocks' cleanup: a failed export removes its data file, then the folders.
    with parents_made(out), side_files() as side, atomic_path(out, force=force) as tmp:
        if data_path is not None:
            externalize_initializer(model, model.graph.initializer[0].name, data_path, side)
        save_model(model, tmp)
        if check:
            run_checker(tmp, full=True)
            report = check_standalone(tmp, artifact, normalize=normalize, fp16=fp16, per_token=per_token)
    return ExportResult(
        path=out,
        kind="onnx",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype="float16" if fp16 else "float32",
        normalize=normalize,
        opset=opset,
        check=report,
        extra={
            "input": STANDALONE_INPUT,
            "output": STANDALONE_OUTPUT,
            "per_token": per_token,
            "external_data": data_path.name if data_path else None,
        },
    )


def export_appended(
    artifact: FilterArtifact,
    host_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    output: str | None = None,
    filtered_name: str | None = None,
    normalize: bool = False,
    check: bool = True,
    force: bool = False,
    external_data: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Append the filter to the ONNX model at `host_path` and write the result to `out` (then check it).

    `log` receives one-line notes for the user (which output was chosen and why, linked files).
    """
    note = log or (lambda _msg: None)
    host_path = Path(host_path)
    out = check_writable(out, force)
    host = load_host(host_path)
    locations = external_locations(host)
    info = append_filter(
        host, artifact, output=output, filtered_name=filtered_name, normalize=normalize, source=str(host_path)
    )
    note(
        f"Filtering output {info.host_output!r} of {host_path.name} ({info.reason}); the result is output 0 "
        f"{value_info_desc(host.graph.output[0])}, the unfiltered tensor stays as {info.unfiltered_name!r}"
    )
    pt = next(t for t in host.graph.initializer if t.name == info.projection_initializer)
    # The filter gets its own data file when the host keeps its weights outside (LLM-sized graphs) and
    # the filter is not tiny, or when inlining it would cross protobuf's 2 GB limit.
    auto = needs_external(host, 0) or (bool(locations) and len(pt.raw_data) > 1 << 20)
    externalize = auto if external_data is None else external_data
    data_path = filter_data_path(out, set(locations)) if externalize else None
    if data_path is not None:
        check_writable(data_path, force)
    report: CheckReport | None = None
    with parents_made(out), side_files() as side:
        linked = link_host_data(host_path, out, locations, side) if locations else []
        if linked:
            note(
                f"Hard-linked {len(linked)} external data file(s) of the host into {out.resolve().parent} "
                f"(no copy; onnxruntime reads external data only from the model's folder): {', '.join(linked)}"
            )
        with atomic_path(out, force=force) as tmp:
            if data_path is not None:
                externalize_initializer(host, info.projection_initializer, data_path, side)
            save_model(host, tmp)
            if check:
                check_or_blame_host(tmp, host_path)
                report = check_appended(host_path, tmp, artifact, info, normalize=normalize)
    return ExportResult(
        path=out,
        kind="onnx-append",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype=dtype_name(info.elem_type),
        normalize=normalize,
        opset=info.opset,
        check=report,
        extra={
            "host": str(host_path),
            "host_output": info.host_output,
            "reason": info.reason,
            "filtered_output": info.filtered_name,
            "unfiltered_output": info.unfiltered_name,
            "per_token": bool(info.rank and info.rank > 2),
            "ir_version": int(host.ir_version),
            "external_data": data_path.name if data_path else None,
            "linked_host_data": linked,
        },
    )
