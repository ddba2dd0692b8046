"""What `--shard` takes, and what `--resume` keeps: the shard split and the resume record of table jobs.

The plan itself (inputs → work units → outputs, with its overlap and collision checks) is
`vectors.plan`. `--shard I/N` (0-based) takes a contiguous block of the sorted work: whole files
when there are several, row groups (Arrow: record batches, of files and streams alike) of a single
file. `Shard.select` is the one partitioner for every format, so concatenating the outputs of
shards 0…N−1 gives exactly the unsharded output, file by file and row by row, each row once.

Every output records what made it: the filter's fingerprints, the settings, and a resume record
(`WorkUnit.record`: input name, size and modification time, the shard's parts, the batch size,
dtype, column…). An existing output is "complete" when it is readable, has the expected row count,
and records exactly what this run would write; "stale" when it is ours (same filter or model) but
made with other options or from another version of the input; "foreign" when it is readable but
made by another filter; "not ours" when it records no filter at all; else "incomplete".
`--resume` skips complete outputs and redoes stale and incomplete ones, so a resumed output is
byte for byte what a fresh run writes. Stale outputs are redone without asking because they are
ours: the user asked for the new options, and replacing our own earlier output loses nothing they
made. A foreign output is only replaced with `--force`, and in a folder output a "not ours" file
not even then (`check_outputs`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embfilter_cli.errors import EmbfilterError, OutputExistsError

TABLE_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
OUTPUT_SUFFIX = {"parquet": ".parquet", "arrow": ".arrow"}
RECORD_KEY = "embfilter.run"  # the resume record (`WorkUnit.record`) in an output's metadata
GLOB_CHARS = set("*?[")


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
    """One output file: its input, its format, and which parts (row groups / batches) it takes.

    `name` is the input's name relative to the input folder (a single file: its file name): the
    input identity a resume record keeps, so a moved dataset still resumes.
    """

    input: Path
    output: Path
    in_format: str
    out_format: str
    parts: tuple[int, ...] | None = None  # None: the whole file
    name: str = ""
    total_parts: int | None = None  # the file's row groups / batches, when `parts` is a shard of them
    in_folder: bool = False  # one file of a folder output: replaced only when embfilter made it

    def record(self, batch_rows: int, options: dict[str, Any]) -> str:
        """The resume record: everything besides the filter that decides this output's bytes (JSON).

        The input is identified by its name, size and modification time (a file rewritten in place
        is redone); `parts` is the shard's block of row groups / batches; `batch_rows` decides the
        output's row groups; `options` are the batch function's own (`resume_options()`: dtype,
        column, pooling…). Engines do not appear: local and Ray write the same bytes.
        """
        stat = os.stat(self.input)
        # [first, count, of]: parts are a contiguous block (`Shard.select`)
        parts = None if self.parts is None else [self.parts[0] if self.parts else 0, len(self.parts), self.total_parts]
        record = {
            "input": {"name": self.name or self.input.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "input_format": self.in_format,
            "output_format": self.out_format,
            "parts": parts,
            "batch_rows": batch_rows,
            **options,
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":"))


def output_state(unit: WorkUnit, expected_rows: int, identity: dict[str, str], expected: dict[str, str]) -> str:
    """ "missing", "complete", "foreign", "not ours", "stale" or "incomplete" (see the module docstring).

    `identity` keys (the filter's projection and mean SHA-256, the model) must match for the output
    to be this run's at all; `expected` is every other `embfilter.*` key a fresh run writes
    (settings and the resume record, `RECORD_KEY`). An output is complete only when its
    `embfilter.*` keys are exactly these (empty values count as absent) and its row count is right.
    """
    from embfilter_cli.vectors.fingerprints import read_fingerprint

    if not unit.output.exists():
        return "missing"
    try:
        rows, meta = read_fingerprint(unit.output)
    except EmbfilterError:
        return "incomplete"
    if not any(k.startswith("embfilter.") for k in meta):
        return "not ours"
    if any(meta.get(k, "") != v for k, v in identity.items()):
        return "foreign"
    found = {k: v for k, v in meta.items() if k.startswith("embfilter.") and v}
    if found != {k: v for k, v in {**identity, **expected}.items() if v}:
        return "stale"
    return "complete" if rows == expected_rows else "incomplete"


def check_outputs(states: dict[str, str], units: Sequence[WorkUnit], force: bool, resume: bool) -> None:
    """Refuse, before any work, outputs that exist and may not be replaced."""
    for unit in units:
        state = states[str(unit.output)]
        if state == "not ours" and unit.in_folder:
            raise OutputExistsError(
                f"{unit.output} is in the output folder but records no filter (embfilter did not make it); a folder "
                "output only replaces files embfilter made, even with --force: move it away or choose another -o"
            )
        if state == "missing" or force:
            continue
        if not resume:
            raise OutputExistsError(
                f"{unit.output} already exists; pass --resume to skip finished outputs, --force to overwrite, "
                "or choose another -o"
            )
        if state in ("foreign", "not ours"):
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
