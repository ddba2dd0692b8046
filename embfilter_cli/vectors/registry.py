"""The vector formats embfilter reads and writes, by name, and how to open one.

One entry per format module; to add a format, write its module (see `base.py`) and add its
`FORMAT` here. The order is the order the CLI lists them in.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from embfilter_cli.vectors import jsonl_format, npy_format, safetensors_format
from embfilter_cli.vectors.base import Sink, SinkOptions, Source, SourceOptions, VectorFormat

REGISTRY: dict[str, VectorFormat] = {
    f.name: f for f in (npy_format.FORMAT, jsonl_format.FORMAT, safetensors_format.FORMAT)
}
FORMATS = tuple(REGISTRY)
EXTENSIONS = {ext: f.name for f in REGISTRY.values() for ext in f.extensions}


def get_format(name: str) -> VectorFormat:
    """The registered format called `name`; ValueError for an unknown one (the CLI only passes FORMATS)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown vector format {name!r}") from None


def open_source(
    fp: IO[bytes],
    fmt: str,
    name: str,
    *,
    path: Path | None = None,
    field: str = "embedding",
    tensor: str | None = None,
    expected_dim: int,
    dim_context: str = "",
) -> Source:
    """Open a reader of format `fmt` on `fp` (a file opened "rb" when `path` is given, else a stream)."""
    options = SourceOptions(path=path, field=field, tensor=tensor, expected_dim=expected_dim, dim_context=dim_context)
    return get_format(fmt).open_source(fp, name, options)


def open_sink(fp: IO[bytes], fmt: str, options: SinkOptions) -> Sink:
    """Open a writer of format `fmt` on `fp`."""
    return get_format(fmt).open_sink(fp, options)
