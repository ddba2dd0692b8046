"""`embfilter verify`: is this filter intact, and was it fitted on that model?

The checks are plain functions (`integrity_checks`, `unembedding_check`) so tests can call them
without the CLI; each returns `Check` records and never prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import click

from embfilter_cli.commands._options import output_options

# Stored float32 rows of a float64-orthonormal basis deviate by ~1e-7 (measured: 6e-8 at d=16,
# 1e-8 at d=2048); 1e-5 is 100× that, and still far below anything that would move a cosine.
ORTHONORMAL_TOL = 1e-5


@dataclass
class Check:
    """One verified property: its name, whether it holds, a human detail and the raw numbers."""

    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # the one-line error message when not ok


@click.command()
@click.argument("filter_path", metavar="[FILTER]", required=False)
@click.option("-m", "--model", default=None, metavar="SPEC",
              help="Also check the filter was fitted on this model's unembedding (alias, Hub id, folder, .safetensors "
                   "or .gguf; same resolution as `fit`).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option("--tensor", "tensor_name", default=None, metavar="NAME",
              help="Use this tensor as W_U [default: the name stored in the filter, else the one `fit` would pick].")
@output_options
def verify(filter_path: str | None, model: str | None, revision: str | None, tensor_name: str | None, json_: bool) -> None:
    """Check a filter's integrity and, with --model, that it belongs to that model.

    \b
    Checks: the file is a readable artifact of a known format version; the projection matches its
    stored SHA-256; its rows are orthonormal (float32 tolerance) and orthogonal to the removed
    directions; with --model, the model's W_U has the SHA-256 stored at fit time.
    Exit status 0 when every check passes, 1 otherwise (the report still goes to stdout when the
    file could be read; an unreadable file gets only the error line).

    \b
    Examples:
      embfilter verify                                  # the newest filter in ./artifacts
      embfilter verify artifacts/qwen2-7b-top256.safetensors --model qwen2-7b
      embfilter verify F --model ./my-llama --json

    Vectors filtered by different filters live in different bases: an index built with one filter
    cannot be queried with vectors filtered by another. Verify both against the same model and
    compare their projection SHA-256s.
    """
    from embfilter_cli.artifact import load_artifact, newest_artifact
    from embfilter_cli.console import info
    from embfilter_cli.errors import ArtifactError

    if filter_path is None:
        path = newest_artifact()
        info(f"Filter: {path} (the newest in {path.parent}/)")
    else:
        path = filter_path
    artifact = load_artifact(path, verify_digest=False)  # the digest is checked below, with both hashes reported
    checks = integrity_checks(artifact)
    model_info = None
    if model is not None:
        check, model_info = unembedding_check(artifact, model, revision, tensor_name)
        checks.append(check)
    if json_:
        from embfilter_cli.console import emit_json

        emit_json({
            "filter": str(artifact.path),
            "ok": all(c.ok for c in checks),
            "checks": [{k: v for k, v in asdict(c).items() if k != "error"} for c in checks],
            "model": model_info,
            "artifact": artifact.summary(),
        })
    else:
        _print_report(artifact, checks)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ArtifactError(failed[0].error)


def integrity_checks(artifact: Any) -> list[Check]:
    """Digest, orthonormality and complement checks of a loaded artifact (see `verify`'s help)."""
    import numpy as np

    from embfilter_cli.artifact import array_sha256

    p = artifact.projection
    k, d = p.shape
    where = str(artifact.path)
    checks = [Check("format", True, f"{artifact.metadata['format']} v{artifact.metadata['format_version']}, "
                    f"projection {k}×{d} float32 ({artifact.metadata.get('projection_kind')})",
                    {"format_version": artifact.metadata["format_version"], "shape": [k, d]})]

    stored, actual = artifact.metadata["projection_sha256"], array_sha256(p)
    checks.append(Check(
        "digest", stored == actual,
        f"projection sha256 {actual[:16]}… " + ("matches the stored digest" if stored == actual else f"≠ stored {stored[:16]}…"),
        {"stored": stored, "actual": actual},
        f"{where}: the projection does not match its stored SHA-256 (stored {stored}, actual {actual}); "
        "the file was modified or damaged, refit it",
    ))

    p64 = p.astype(np.float64)
    removed = artifact.removed_directions.astype(np.float64)
    r = removed.shape[0]
    if artifact.reduced:
        gram_err = float(np.abs(p64 @ p64.T - np.eye(k)).max()) if k else 0.0
        name, what = "orthonormal", f"max |P Pᵀ − I| = {gram_err:.1e}"
        bad_what = "the rows of the projection are not orthonormal"
        kept_dims = k
    else:
        # A projector I − V_e V_eᵀ is symmetric and idempotent; its trace is the kept dimension.
        gram_err = max(float(np.abs(p64 - p64.T).max()), float(np.abs(p64 @ p64 - p64).max())) if k else 0.0
        name, what = "projector", f"max(|P − Pᵀ|, |P² − P|) = {gram_err:.1e}"
        bad_what = "the projector is not symmetric and idempotent"
        kept_dims = int(round(float(np.trace(p64))))
    ok = gram_err <= ORTHONORMAL_TOL  # NaN compares False: a non-finite projection fails here
    checks.append(Check(
        name, ok, f"{what} (tolerance {ORTHONORMAL_TOL:.0e})", {"max_error": gram_err, "tolerance": ORTHONORMAL_TOL},
        f"{where}: {bad_what} ({what} > {ORTHONORMAL_TOL:.0e}); the file was damaged or edited, refit it",
    ))

    cross = float(np.abs(p64 @ removed.T).max()) if r and k else 0.0
    adds_up = kept_dims + r == d
    ok = cross <= ORTHONORMAL_TOL and adds_up
    what = f"max |P Rᵀ| = {cross:.1e}; {kept_dims} kept + {r} removed {'=' if adds_up else '≠'} {d}"
    checks.append(Check(
        "complement", ok, what, {"max_cross": cross, "kept": kept_dims, "removed": r, "hidden_size": d},
        f"{where}: the kept and removed directions do not split the hidden space ({what}); refit it",
    ))
    return checks


def unembedding_check(artifact: Any, model: str, revision: str | None, tensor_name: str | None) -> tuple[Check, dict[str, Any]]:
    """Recompute the model's W_U SHA-256 and compare it with the one stored at fit time."""
    from embfilter_cli.console import info
    from embfilter_cli.errors import UnembeddingNotFoundError
    from embfilter_cli.locate import resolve_model
    from embfilter_cli.unembedding import read_unembedding

    location = resolve_model(model, revision=revision, tensor_name=tensor_name)
    info(f"Model: {location.source} ({location.kind.replace('_', ' ')})")
    stored_tensor = artifact.metadata.get("tensor_name") or None
    try:
        unemb = read_unembedding(location, tensor_name=tensor_name or stored_tensor)
    except UnembeddingNotFoundError:
        if tensor_name or not stored_tensor:
            raise
        # This model has no tensor of the stored name: fingerprint the one `fit` would use (a mismatch, surely).
        unemb = read_unembedding(location)
    stored = artifact.unembedding_sha256
    ok = unemb.sha256 == stored
    model_info = {"spec": model, "source": location.source, "revision": location.revision,
                  "tensor_name": unemb.tensor_name, "unembedding_sha256": unemb.sha256, "match": ok}
    detail = (f"W_U sha256 {unemb.sha256[:16]}… of {location.source} ({unemb.tensor_name}) "
              + ("matches the filter" if ok else f"≠ stored {stored[:16]}…"))
    error = (
        f"{artifact.path} was not fitted on {location.source}: the filter stores W_U sha256 {stored} "
        f"({artifact.model_source}, {stored_tensor}) but {unemb.tensor_name} there has sha256 {unemb.sha256}; "
        f"use a filter fitted on this model or refit with `embfilter fit --model {model}`"
    )
    return Check("unembedding", ok, detail, {"stored": stored, "actual": unemb.sha256}, error), model_info


def _print_report(artifact: Any, checks: list[Check]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from embfilter_cli.console import out_console

    band = artifact.band
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("filter", escape(str(artifact.path)))
    table.add_row("model", escape(f"{artifact.model_source} ({artifact.metadata.get('tensor_name')})"))
    table.add_row("band", f"remove top {band['top']}, keep {band['start']}..{band['start'] + band['keep'] - 1}, "
                          f"remove bottom {band['bottom']}")
    table.add_row("sha256(W_U)", artifact.unembedding_sha256)
    for check in checks:
        mark = "[green]OK[/green]  " if check.ok else "[red]FAIL[/red]"
        table.add_row(check.name, f"{mark} {escape(check.detail)}")
    out_console.print(table)
