"""Which filter made a file of vectors: the `embfilter.*` metadata of Parquet, Arrow and safetensors outputs.

`apply` records the filter's fingerprints in every output that has a place for metadata (Parquet
and Arrow schema metadata, the safetensors header). `vector_files` + `read_fingerprint` let
`embfilter verify F --vectors PATH` check a file or a whole folder against a filter; `--resume`
uses the same reader to tell finished outputs from foreign or incomplete ones.

Metadata alone can be copied onto any file, so `vectors_check` also checks the vectors themselves
(`vector_content`: the column, its width, row counts, unit length, the kept subspace).

Not handled: .npy and JSONL outputs carry no metadata, so they cannot be verified.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embfilter_cli.errors import InputDataError

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.filters.checks import Check

FINGERPRINT_SUFFIXES = (".parquet", ".pq", ".arrow", ".feather", ".ipc", ".safetensors")


def read_fingerprint(path: str | os.PathLike[str]) -> tuple[int, dict[str, str]]:
    """(rows, metadata) of a Parquet, Arrow IPC or safetensors file, reading headers/footers only.

    Raises:
        InputDataError: unreadable file, or a format without metadata.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        from embfilter_cli.vectors.parquet import parquet_footer

        return parquet_footer(p)
    if suffix in (".arrow", ".feather", ".ipc"):
        from embfilter_cli.vectors.arrow_ipc import ipc_footer

        return ipc_footer(p)
    if suffix == ".safetensors":
        return _safetensors_fingerprint(p)
    raise InputDataError(
        f"{p} is not a Parquet, Arrow or safetensors file; only those formats record which filter made them"
    )


def _safetensors_fingerprint(path: Path) -> tuple[int, dict[str, str]]:
    # The shared header parser: a header of the wrong JSON types (a list as __metadata__, a
    # non-numeric shape) is one InputDataError, as when the file is read as input.
    from embfilter_cli.vectors.safetensors_format import read_safetensors_header

    with open(path, "rb") as fp:
        header = read_safetensors_header(fp, str(path))
    shapes = [e.shape for e in header.entries]
    rows = int(shapes[0][0]) if len(shapes) == 1 and shapes[0] else -1
    return rows, dict(header.metadata or {})


def vector_files(path: str | os.PathLike[str]) -> list[Path]:
    """The file itself, or every Parquet/Arrow/safetensors file under a folder (recursive, sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in FINGERPRINT_SUFFIXES
            and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
        )
        if not files:
            raise InputDataError(f"folder {p} holds no Parquet, Arrow or safetensors files to verify")
        return files
    raise InputDataError(f"{p} does not exist; pass the file or folder that `embfilter apply` wrote")


@dataclass
class VectorCheck:
    """The outcome of checking one file's fingerprint against a filter."""

    path: str
    ok: bool
    rows: int
    projection_sha256: str | None
    detail: str


def check_vector_file(path: Path, projection_sha256: str, mean_sha256: str = "") -> VectorCheck:
    """Whether `path` records `projection_sha256` (and the mean's SHA-256, empty when uncentred) as its filter."""
    rows, meta = read_fingerprint(path)
    found = meta.get("embfilter.projection_sha256")
    if found is None:
        return VectorCheck(str(path), False, rows, None, f"{path} records no filter (no embfilter.* metadata)")
    if found != projection_sha256:
        return VectorCheck(
            str(path),
            False,
            rows,
            found,
            f"{path} was made by another filter (projection SHA-256 {found[:16]}…, this filter's is "
            f"{projection_sha256[:16]}…); do not mix them in one index",
        )
    if meta.get("embfilter.mean_sha256", "") != mean_sha256:
        return VectorCheck(
            str(path),
            False,
            rows,
            found,
            f"{path} was made with the same projection but {'another mean' if mean_sha256 else 'a mean'} "
            f"(centring differs: stored mean SHA-256 {meta.get('embfilter.mean_sha256') or 'none'}); "
            "do not mix them in one index",
        )
    return VectorCheck(str(path), True, rows, found, f"{rows} rows, made by this filter")


def _check_with_content(artifact: FilterArtifact, path: Path, sha: str, mean_sha: str) -> VectorCheck:
    """`check_vector_file`, then, when the metadata names this filter, what the vectors themselves prove."""
    from embfilter_cli.vectors.vector_content import content_problem

    result = check_vector_file(path, sha, mean_sha)
    if result.ok:
        rows, meta = read_fingerprint(path)
        problem = content_problem(artifact, path, rows, meta)
        if problem is not None:
            return VectorCheck(str(path), False, rows, result.projection_sha256, problem)
    return result


def vectors_check(artifact: FilterArtifact, path: str | os.PathLike[str]) -> Check:
    """One `filters.checks.Check` over a file or folder of vectors: all made by `artifact`?

    Beyond the recorded fingerprints, every vector is read and checked against what the filter's
    output must be (`vector_content`). The check fails naming the first file made by another
    filter, by none, or whose data contradicts its metadata.
    """
    from embfilter_cli.filters.checks import Check

    sha = artifact.metadata.get("projection_sha256", "")
    mean_sha = artifact.metadata.get("mean_sha256", "")
    results = [_check_with_content(artifact, f, sha, mean_sha) for f in vector_files(path)]
    bad = [r for r in results if not r.ok]
    rows = sum(max(r.rows, 0) for r in results)
    values = {"path": str(path), "files": len(results), "rows": rows, "files_failed": len(bad)}
    if bad:
        detail = f"{len(bad)} of {len(results)} file(s) not made by this filter; first: {bad[0].path}"
        return Check("vectors", False, detail, values, error=bad[0].detail)
    return Check("vectors", True, f"{len(results)} file(s), {rows:,} rows, all made by this filter", values)
