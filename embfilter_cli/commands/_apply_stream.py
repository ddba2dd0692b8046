"""`embfilter apply` on one vector file or stream (npy, JSONL, safetensors): open, stream, progress.

The command parses and validates options (`commands/apply.py`); this helper wires the input, the
sink and the progress bar around `vectors.stream.filter_stream`. The decisions without I/O
(provenance, output dtype, summary) are in `vectors.apply_job`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import IO, Any

from embfilter_cli.errors import UsageError


def open_input(
    stack: contextlib.ExitStack,
    input_path: str,
    input_format: str | None,
    field: str,
    tensor: str | None,
    artifact: Any,
    formats: tuple[str, ...],
) -> Any:
    """Open INPUT with the right reader; the format comes from --format, the extension, or the first bytes."""
    from embfilter_cli.vectors.apply_job import dim_context
    from embfilter_cli.vectors.detect import format_from_path, peek_head, sniff_format
    from embfilter_cli.vectors.registry import open_source

    context = dim_context(artifact)
    if input_path == "-":
        stream, head = peek_head(_binary(sys.stdin))
        fmt = input_format or sniff_format(head) or ("jsonl" if not head.strip() else None)
        name, path = "stdin", None
        fp: IO[bytes] = stream
    else:
        path = Path(input_path)
        fp = stack.enter_context(open(path, "rb"))
        fmt = input_format or format_from_path(path)
        if fmt is None:
            fmt = sniff_format(fp.read(16))
            fp.seek(0)
        name, head = str(path), b""
    if fmt is None:
        raise UsageError(f"cannot tell the format of {name}; pass --format {'|'.join(formats)}")
    source = open_source(
        fp, fmt, name, path=path, field=field, tensor=tensor, expected_dim=artifact.hidden_size, dim_context=context
    )
    stack.callback(source.close)
    return source


def _binary(stream: Any) -> IO[bytes]:
    """The byte stream under stdin, as CliRunner and real terminals both provide."""
    return getattr(stream, "buffer", stream)


def run(
    stack: contextlib.ExitStack,
    source: Any,
    artifact: Any,
    output: str,
    to_stdout: bool,
    out_format: str,
    out_dtype: str,
    field: str,
    tensor: str | None,
    batch_size: int | None,
    normalize: bool,
    allow_nonfinite: bool,
    force: bool,
) -> Any:
    """Stream every row of `source` through the filter into the output; the stream's stats."""
    from embfilter_cli.files import atomic_path
    from embfilter_cli.vectors.apply_job import dim_context, provenance
    from embfilter_cli.vectors.base import SinkOptions
    from embfilter_cli.vectors.registry import get_format, open_sink
    from embfilter_cli.vectors.stream import filter_stream

    rows = batch_size or get_format(source.format).batch_rows
    if to_stdout:
        from embfilter_cli.console import stdout_bytes

        out_fp = stdout_bytes()
        seekable = False
    else:
        tmp = stack.enter_context(atomic_path(output, force=force))
        out_fp = stack.enter_context(open(tmp, "wb"))  # closed before atomic_path renames it (LIFO)
        seekable = True
    options = SinkOptions(
        seekable=seekable, source=source, field=field, tensor=tensor, metadata=provenance(artifact, normalize)
    )
    sink = open_sink(out_fp, out_format, options)
    with _progress(source, rows) as report:
        stats = filter_stream(
            source,
            sink,
            artifact.projection,
            mean=artifact.mean,
            batch_rows=rows,
            output_dtype=out_dtype,
            normalize=normalize,
            allow_nonfinite=allow_nonfinite,
            dim_context=dim_context(artifact),
            progress=report,
        )
    out_fp.flush()
    return stats


def _progress(source: Any, batch_rows: int) -> Any:
    """The progress bar for inputs larger than one batch (JSONL: 16 MiB); none when small."""
    from embfilter_cli.console import progress_bar

    total = source.progress_total
    small = total is not None and (total <= batch_rows if source.format != "jsonl" else total < 16 << 20)
    return progress_bar("Filtering", total, show=not small)
