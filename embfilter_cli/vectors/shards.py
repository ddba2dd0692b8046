"""Which files (or row groups) a run processes, where each output goes, and what `--resume` skips.

An input is one Parquet/Arrow file, a folder of them (searched recursively; names starting with
`.` or `_`, such as `_SUCCESS` or our own temporary files, are skipped), or a glob
(`'data/*.parquet'`, `**` allowed). A folder or glob gives a folder output with the same relative
file names. `--shard I/N` (0-based) takes a contiguous block of the sorted work: whole files when
there are several, row groups (Arrow: record batches) of a single file. Blocks are contiguous, so
concatenating the outputs of shards 0…N−1 gives exactly the unsharded output, file by file and
row by row.

An existing output is "complete" when it is readable, has the expected row count, and carries
this filter's fingerprint (same projection and mean SHA-256, same normalisation); "foreign" when it is
readable but made by another filter or by none; else "incomplete". `--resume` skips complete
outputs and redoes incomplete ones; a foreign output is only replaced with `--force`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from embfilter_cli.errors import EmbfilterError, InputDataError, OutputExistsError

TABLE_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
OUTPUT_SUFFIX = {"parquet": ".parquet", "arrow": ".arrow"}
_GLOB_CHARS = set("*?[")


def table_format(path: str | os.PathLike[str]) -> str | None:
    """ "parquet" or "arrow" from a file name's extension, else None."""
    return TABLE_EXTENSIONS.get(Path(path).suffix.lower())


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"3/16"` → Shard(3, 16). Raises ValueError with the reason for anything else."""
        left, sep, right = text.partition("/")
        try:
            index, count = int(left), int(right)
        except ValueError:
            index = count = -1
        if not sep or count < 1 or index < 0:
            raise ValueError(f"{text!r} is not I/N with 0 <= I < N (e.g. 3/16 is the 4th of 16 shards)")
        if index >= count:
            raise ValueError(
                f"{text!r}: shard index {index} must be below the shard count {count} (0-based: 0..{count - 1})"
            )
        return cls(index, count)

    def select(self, n: int) -> range:
        """The indices of this shard's contiguous block of `n` items (sizes differ by at most one)."""
        return range(self.index * n // self.count, (self.index + 1) * n // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class WorkUnit:
    """One output file: its input, its format, and which parts (row groups / batches) it takes."""

    input: Path
    output: Path
    in_format: str
    out_format: str
    parts: tuple[int, ...] | None = None  # None: the whole file

    @property
    def name(self) -> str:
        """The input's name, for messages."""
        return str(self.input)


def expand_inputs(spec: str) -> tuple[list[Path], Path | None]:
    """The input files of `spec` (a file, a folder or a glob), sorted, and the folder their names are relative to.

    Returns:
        (files, root): `root` is None for a single file; else outputs keep the path relative to it.

    Raises:
        InputDataError: nothing there, or a folder/glob without Parquet or Arrow files.
    """
    path = Path(spec)
    if path.is_file():
        return [path], None
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and table_format(p) and not _hidden(p.relative_to(path))]
        if not files:
            raise InputDataError(
                f"folder {path} holds no .parquet or .arrow files (searched recursively); pass a file or a glob"
            )
        return sorted(files, key=lambda p: p.relative_to(path).as_posix()), path
    if _GLOB_CHARS & set(spec):
        root = _glob_root(spec)
        files = [Path(p) for p in glob.glob(spec, recursive=True)]
        files = [p for p in files if p.is_file() and not _hidden(p.relative_to(root))]
        if not files:
            raise InputDataError(
                f"the pattern {spec!r} matches no files; check the path (quote it so the shell keeps it)"
            )
        return sorted(files, key=lambda p: p.relative_to(root).as_posix()), root
    raise InputDataError(f"{spec} does not exist; pass a file, a folder or a quoted glob such as 'data/*.parquet'")


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def plan_units(
    files: Sequence[Path],
    root: Path | None,
    output: Path,
    out_format: str | None,
    shard: Shard | None,
    count_parts: object = None,
) -> list[WorkUnit]:
    """One `WorkUnit` per output file of this shard.

    Args:
        files, root: from `expand_inputs`.
        output: the output file (single input) or folder (folder/glob input).
        out_format: "parquet"/"arrow", or None for each input's own format.
        shard: which block to take, or None for everything.
        count_parts: `f(path, fmt) -> number of row groups/batches`, needed to shard a single file.
    """
    units = []
    if root is None:
        (src,) = files
        fmt = table_format(src) or "parquet"
        parts = None
        if shard is not None:
            total = count_parts(src, fmt)  # type: ignore[operator]
            parts = tuple(shard.select(total))
        units.append(WorkUnit(src, output, fmt, out_format or fmt, parts))
        return units
    chosen = [files[i] for i in (shard.select(len(files)) if shard is not None else range(len(files)))]
    seen: dict[Path, Path] = {}
    for src in chosen:
        fmt = table_format(src) or "parquet"
        target_format = out_format or fmt
        rel = src.relative_to(root)
        if target_format != fmt:
            rel = rel.with_suffix(OUTPUT_SUFFIX[target_format])
        dest = output / rel
        if dest in seen:
            raise InputDataError(f"{seen[dest]} and {src} would both be written to {dest}; rename one of them")
        seen[dest] = src
        units.append(WorkUnit(src, dest, fmt, target_format))
    return units


def output_state(unit: WorkUnit, expected_rows: int, identity: dict[str, str], settings: dict[str, str]) -> str:
    """ "missing", "complete", "foreign" or "incomplete" (see the module docstring).

    `identity` keys (the filter's projection and mean SHA-256, the model) must match for the output
    to be this run's at all; `settings` keys (normalisation, pooling…) and the row count must match
    for it to be complete.
    """
    from embfilter_cli.vectors.fingerprints import read_fingerprint

    if not unit.output.exists():
        return "missing"
    try:
        rows, meta = read_fingerprint(unit.output)
    except EmbfilterError:
        return "incomplete"
    if any(meta.get(k, "") != v for k, v in identity.items()) or not any(k.startswith("embfilter.") for k in meta):
        return "foreign"
    if any(meta.get(k, "") != v for k, v in settings.items()) or rows != expected_rows:
        return "incomplete"
    return "complete"


def check_outputs(states: dict[str, str], units: Sequence[WorkUnit], force: bool, resume: bool) -> None:
    """Refuse, before any work, outputs that exist and may not be replaced."""
    for unit in units:
        state = states[str(unit.output)]
        if state == "missing" or force:
            continue
        if not resume:
            raise OutputExistsError(
                f"{unit.output} already exists; pass --resume to skip finished outputs, --force to overwrite, "
                "or choose another -o"
            )
        if state == "foreign":
            raise OutputExistsError(
                f"{unit.output} was not made by this filter (its filter or model fingerprint differs, or it records none); "
                "--resume will not replace it: remove it or pass --force"
            )


def check_folders_writable(units: Sequence[WorkUnit]) -> None:
    """Refuse, before any model or input is read, outputs whose folder cannot be written (read-only, not a folder)."""
    from embfilter_cli.files import check_writable

    for unit in units:
        check_writable(unit.output, force=True)  # whether it may be replaced is `check_outputs`' question


def remove_stale_temporaries(output: Path) -> int:
    """Delete `.NAME.*.tmp` files a killed run left next to `output`; returns how many."""
    removed = 0
    if output.parent.is_dir():
        for stale in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):
            try:
                stale.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed
