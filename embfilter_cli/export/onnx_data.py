"""External data files: the filter's own `<output>.data`, and the host's data files beside the output.

onnx and onnxruntime only read external data inside the model's own folder (no `..`, no absolute
paths, no symlinks), so for an output in another folder the host's data files are hard-linked there
(no copy, host files untouched); where a hard link is impossible (another filesystem) the export
stops and says to write next to the host. Every side file is undone if the export fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from embfilter_cli.errors import ExportError
from embfilter_cli.export.onnx_graph import first_line, onnx_module
from embfilter_cli.files import make_parents, remove_empty

if TYPE_CHECKING:
    import onnx
    from onnx import GraphProto, TensorProto


# Protobuf refuses messages of 2 GiB; keep a margin for the graph's own bytes.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    onnx = onnx_module()

    def from_graph(graph: GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for g in attr.graphs:
                    yield from from_graph(g)

    for tensor in from_graph(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise ExportError(
        f"tensor {tensor.name!r} is marked as external data but has no location; the host file is damaged"
    )


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external data files a model refers to (relative to its folder)."""
    return sorted({_location(t) for t in _external_tensors(model)})


def needs_external(model: onnx.ModelProto, extra_bytes: int) -> bool:
    """Whether the model plus `extra_bytes` would cross protobuf's 2 GB limit if saved inline."""
    return model.ByteSize() + extra_bytes > PROTOBUF_LIMIT


def filter_data_path(out: Path, reserved: set[str]) -> Path:
    """`<out>.data` beside the output, or `<out>.embfilter.data` if the host already uses that name."""
    name = f"{out.name}.data"
    if name in reserved:  # never write over (or share) one of the host's own data files
        name = f"{out.name}.embfilter.data"
    return out.with_name(name)


class SideFiles:
    """Files written beside the output (filter data, links to host data), undone if the export fails.

    A side file that already exists (re-export with --force) is moved aside first and put back on
    failure, so a failed export never breaks the previous output.
    """

    def __init__(self) -> None:
        self.created: list[Path] = []
        self.backups: list[tuple[Path, Path]] = []
        self.folders: list[Path] = []  # made for side files (a host's `weights/`), outermost first

    def claim(self, path: Path) -> None:
        """Free `path` for a new file, remembering how to restore what was there."""
        if path.exists():
            backup = path.with_name(f".{path.name}.{os.getpid()}.bak")
            os.replace(path, backup)
            self.backups.append((backup, path))
        self.created.append(path)

    def rollback(self) -> None:
        """Remove the side files created so far and restore the backed-up originals."""
        for p in reversed(self.created):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for backup, original in self.backups:
            with contextlib.suppress(FileNotFoundError):
                os.replace(backup, original)
        remove_empty(self.folders)

    def commit(self) -> None:
        """Keep the side files and delete the backups of what they replaced."""
        for backup, _ in self.backups:
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()


@contextlib.contextmanager
def side_files() -> Iterator[SideFiles]:
    """A `SideFiles` for the duration of an export: rolled back if the block raises, committed if not."""
    side = SideFiles()
    try:
        yield side
    except BaseException:
        side.rollback()
        raise
    side.commit()


def externalize_initializer(model: onnx.ModelProto, name: str, data_path: Path, side: SideFiles) -> None:
    """Move initializer `name` into its own data file `data_path`."""
    onnx = onnx_module()
    tensor = next(t for t in model.graph.initializer if t.name == name)
    raw = onnx.numpy_helper.to_array(tensor).tobytes()  # to_array gives native little-endian C order
    side.claim(data_path)
    data_path.write_bytes(raw)
    tensor.raw_data = raw  # set_external_data insists on raw_data being present, then we drop it
    for fld in ("float_data", "double_data", "int32_data", "int64_data"):
        tensor.ClearField(fld)
    onnx.external_data_helper.set_external_data(tensor, location=data_path.name, offset=0, length=len(raw))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL


def link_host_data(host_path: Path, out: Path, locations: list[str], side: SideFiles) -> list[str]:
    """Make the host's external data files visible from `out`'s folder; return those linked.

    onnx and onnxruntime reject `..`, absolute and symlinked locations, so a relative path back to
    the host folder cannot work; a hard link shares the bytes without copying or touching them.
    """
    host_dir = host_path.resolve().parent
    out_dir = out.resolve().parent
    if host_dir == out_dir:
        return []
    linked = []
    for loc in locations:
        src = (host_dir / loc).resolve()
        if Path(loc).is_absolute() or host_dir not in src.parents:
            raise ExportError(
                f"the host refers to external data {loc!r} outside its own folder, which onnxruntime refuses to load; "
                "fix the host's locations first"
            )
        if not src.is_file():
            raise ExportError(f"the host's external data file {src} is missing; the host cannot be loaded as it is")
        dst = out_dir / loc
        if dst.exists():
            if os.path.samefile(src, dst):
                continue  # linked by an earlier export
            raise ExportError(
                f"{dst} exists and is not the host's data file {src}; the output folder needs the host's file under "
                f"that name: write the output next to the host (-o {host_dir}/NAME.onnx) or remove {dst}"
            )
        side.folders.extend(make_parents(dst.parent))
        try:
            os.link(src, dst)
        except OSError as exc:
            reason = "another filesystem" if exc.errno == errno.EXDEV else exc.strerror or type(exc).__name__
            raise ExportError(
                f"cannot hard-link the host's external data {src} into {out_dir} ({reason}); onnxruntime only reads "
                f"external data from the model's own folder, so write the output next to the host: -o {host_dir}/NAME.onnx"
            ) from exc
        side.created.append(dst)
        linked.append(loc)
    return linked


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path`; protobuf's 2 GB limit becomes an ExportError suggesting --external-data."""
    onnx = onnx_module()
    try:
        onnx.save_model(model, str(path))
    except ValueError as exc:  # protobuf's 2 GB limit
        raise ExportError(f"the graph is too large to save inline ({first_line(exc)}); pass --external-data") from exc
