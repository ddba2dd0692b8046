"""The one planner of table jobs: inputs → work units → outputs, for `apply` and `embed`, local or on Ray.

`plan_job` expands the input (a file, a folder or a quoted glob), maps every input file to its
output, and refuses, before anything is read or written, a plan that would lose data:

- an output that is an input (`-o` the input folder, or a file onto itself): never replaced, even
  with `--force`;
- outputs that a later run would read back as inputs (an output folder inside the input folder,
  `data/out`, or matched by the glob): refused, so reruns and `--resume` see the same inputs;
- two inputs mapped to one output (`x.arrow` and `x.parquet` with `--to parquet`): refused naming
  both, checked over the whole dataset before `--shard` picks its block, so two shards cannot
  overwrite each other either.

Folders are searched recursively in sorted order. Names starting with `.` or `_` (`_SUCCESS`,
our own temporary files) are skipped by design and silently. Symlinked sub-folders and files are
followed, each real folder and file once: a link back to a folder already being read (a loop) or
a second path to the same file is skipped, and so is a broken link; each such skip is listed in
`Plan.skipped` for the command to report, since it leaves rows out on purpose.

The shard split itself is `shards.Shard.select` (one partitioner for every format): whole files
of a folder or glob, row groups / record batches of a single file (see `shards`).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from embfilter_cli.errors import InputDataError, UsageError
from embfilter_cli.vectors.shards import GLOB_CHARS, OUTPUT_SUFFIX, Shard, WorkUnit, table_format

CountParts = Callable[[Path, str], int]


@dataclass
class Plan:
    """The work units of this shard, and what the input search skipped (one line each, for the user)."""

    units: list[WorkUnit]
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Found:
    """The input files of a spec, the folder their names are relative to, and what was skipped."""

    files: list[Path]
    root: Path | None
    skipped: list[str]
    folders: dict[Path, Path] = field(default_factory=dict)  # real folder -> its path as found
    reals: dict[Path, Path] = field(default_factory=dict)  # real file -> its path as found
    pattern: tuple[str, ...] | None = None  # glob parts below root
    spec: str = ""  # the glob as given, for messages

    def sort(self) -> None:
        """Files in the order of their names relative to the root (what `--shard` splits)."""
        root = self.root or Path(".")
        self.files.sort(key=lambda p: p.relative_to(root).as_posix())


def plan_job(
    spec: str,
    output: str,
    *,
    in_format: str | None = None,
    out_format: str | None = None,
    shard: Shard | None = None,
    count_parts: CountParts | None = None,
) -> Plan:
    """Plan a table job: every output of the shard, after the overlap, collision and loop checks.

    Args:
        spec: the input: a Parquet/Arrow file, a folder, or a glob (`**` allowed).
        output: the output file, or a folder (always for a folder or glob input; a single input
            written into an existing folder, or a path ending in `/`, keeps its name).
        in_format: read every input as this format instead of by extension.
        out_format: "parquet"/"arrow"; None: from the output's extension (single file), else each input's.
        shard: which block to take, or None for everything.
        count_parts: `f(path, fmt) -> number of row groups/batches`, needed to shard a single file.

    Raises:
        InputDataError: no inputs, an output that is an input or would be read back as one, two
            inputs for one output.
        UsageError: a file given as -o for a folder input, or a single output that is not a table.
    """
    found = _expand(spec)
    out = Path(output)
    if found.root is not None and out.exists() and not out.is_dir():
        raise UsageError(f"{output} is a file, but a folder or glob input needs a folder for -o")
    if found.root is None:
        if out.is_dir() or output.endswith(("/", "\\")):
            out = out / found.files[0].name
        if out_format is None:
            if table_format(out) is None:
                raise UsageError(
                    f"{output}: Parquet/Arrow inputs give Parquet/Arrow outputs, tables give tables "
                    "(name a .parquet or .arrow file)"
                )
            out_format = table_format(out)
    units = _units(found, out, in_format, out_format)
    _refuse_overlap(found, units, out)
    if shard is None:
        return Plan(units, found.skipped)
    if found.root is not None:
        return Plan([units[i] for i in shard.select(len(units))], found.skipped)
    (unit,) = units
    if count_parts is None:
        raise ValueError("sharding a single file needs count_parts")
    unit.total_parts = count_parts(unit.input, unit.in_format)
    unit.parts = tuple(shard.select(unit.total_parts))
    return Plan(units, found.skipped)


def _units(found: _Found, out: Path, in_format: str | None, out_format: str | None) -> list[WorkUnit]:
    """One unit per input file (every shard's), refusing two inputs that map to one output."""
    units: list[WorkUnit] = []
    seen: dict[Path, Path] = {}
    for src in found.files:
        fmt = in_format or table_format(src) or "parquet"
        target = out_format or fmt
        if found.root is None:
            dest, name = out, src.name
        else:
            rel = src.relative_to(found.root)
            name = rel.as_posix()
            if target != (table_format(src) or fmt):
                rel = rel.with_suffix(OUTPUT_SUFFIX[target])
            dest = out / rel
        if dest in seen:
            raise InputDataError(
                f"{seen[dest]} and {src} would both be written to {dest}; rename one of them (or write each "
                "format to its own -o folder)"
            )
        seen[dest] = src
        units.append(WorkUnit(src, dest, fmt, target, name=name, in_folder=found.root is not None))
    return units


def _refuse_overlap(found: _Found, units: list[WorkUnit], out: Path) -> None:
    """Refuse outputs that are inputs, or that a later run would read back as inputs."""
    chosen = set(found.files)  # real paths were found by the walk; a single file has none yet
    inputs = {real: path for real, path in found.reals.items() if path in chosen} or {_real(f): f for f in chosen}
    for unit in units:
        real = _real(unit.output)
        if real in inputs:
            raise InputDataError(
                f"-o {out} would overwrite the input {inputs[real]} with its own output; inputs are never replaced "
                "(not even with --force): choose another -o"
            )
        reader = _read_back(found, real)
        if reader is None:
            continue
        if found.pattern is not None:
            where = f": its outputs (such as {unit.output}) match the input pattern {found.spec!r}"
        elif _real(out) == _real(reader):
            where = f" is the input folder: its outputs (such as {unit.output})"
        else:
            where = f" is inside the input folder {reader}: its outputs (such as {unit.output})"
        raise InputDataError(
            f"-o {out}{where} and would be read back as inputs by the next run or --resume; choose an -o outside it"
        )


def _read_back(found: _Found, real: Path) -> Path | None:
    """The input folder through which a file at `real` would be found as an input, or None."""
    if found.root is None or table_format(real) is None:
        return None
    for folder in real.parents:
        if folder not in found.folders:
            continue
        seen_as = found.folders[folder]
        rel = real.relative_to(folder).parts
        if _hidden(rel):
            return None
        if found.pattern is not None and not _matches(seen_as.relative_to(found.root).parts + rel, found.pattern):
            return None
        return found.root
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith((".", "_")) for part in parts)


def _expand(spec: str) -> _Found:
    path = Path(spec)
    if path.is_file():
        return _Found([path], None, [])
    if path.is_dir():
        found = _Found([], path, [])
        _walk(found, path, 0, None)
        found.sort()
        if not found.files:
            raise InputDataError(
                f"folder {path} holds no .parquet or .arrow files (searched recursively); pass a file or a glob"
                + _skipped_note(found)
            )
        return found
    if GLOB_CHARS & set(spec):
        root = _glob_root(spec)
        pattern = path.parts[len(root.parts) :]
        found = _Found([], root, [], pattern=pattern, spec=spec)
        if root.is_dir():
            _walk(found, root, 0, None if "**" in pattern else len(pattern) - 1)
        found.files = [f for f in found.files if _matches(f.relative_to(root).parts, pattern)]
        found.sort()
        if not found.files:
            raise InputDataError(
                f"the pattern {spec!r} matches no files; check the path (quote it so the shell keeps it)"
                + _skipped_note(found)
            )
        return found
    raise InputDataError(f"{spec} does not exist; pass a file, a folder or a quoted glob such as 'data/*.parquet'")


def _skipped_note(found: _Found) -> str:
    return f" (skipped: {'; '.join(found.skipped)})" if found.skipped else ""


def _walk(found: _Found, folder: Path, depth: int, max_depth: int | None) -> None:
    """Collect table files under `folder`, following links once per real folder and file (see the module docstring)."""
    real = _real(folder)
    if real in found.folders:
        found.skipped.append(f"{folder} (a link to {found.folders[real]}, read already)")
        return
    found.folders[real] = folder
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        found.skipped.append(f"{folder} (unreadable: {exc.strerror or type(exc).__name__})")
        return
    for entry in entries:
        if entry.name.startswith((".", "_")):
            continue
        path = Path(entry.path)
        if entry.is_dir():  # follows links
            if max_depth is None or depth < max_depth:
                _walk(found, path, depth + 1, max_depth)
        elif entry.is_file():
            if table_format(path) is None:
                continue
            target = _real(path)
            if target in found.reals:
                found.skipped.append(f"{path} (the same file as {found.reals[target]})")
                continue
            found.reals[target] = path
            found.files.append(path)
        elif entry.is_symlink() and table_format(path) is not None:
            found.skipped.append(f"{path} (a broken link)")


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Glob matching by path segment; `**` matches any number of folders (as `glob.glob(recursive=True)`)."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _matches(parts[1:], rest)


def _glob_root(pattern: str) -> Path:
    fixed = []
    for part in Path(pattern).parts:
        if GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")
