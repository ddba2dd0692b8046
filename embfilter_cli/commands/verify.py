"""`embfilter verify`: is this filter intact, and was it fitted on that model?

The checks live in `embfilter_cli.filters.checks` (plain functions returning `Check` records, so tests
call them without the CLI); this module resolves the inputs and formats the report.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from embfilter_cli.commands._options import output_options


@click.command()
@click.argument("filter_path", metavar="[FILTER]", required=False)
@click.option(
    "-m",
    "--model",
    default=None,
    metavar="SPEC",
    help="Also check the filter was fitted on this model's unembedding (alias, Hub id, folder, .safetensors "
    "or .gguf; same resolution as `fit`).",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option(
    "--tensor",
    "tensor_name",
    default=None,
    metavar="NAME",
    help="Use this tensor as W_U [default: the name stored in the filter, else the one `fit` would pick].",
)
@click.option(
    "--vectors",
    "vectors_path",
    default=None,
    metavar="PATH",
    help="Also check that these vectors (a Parquet/Arrow/safetensors file from `apply`, or a folder of them) "
    "were made by this filter: their recorded fingerprints, and what the vectors prove (the column exists, "
    "every vector has the filter's width, row counts add up, unit length when marked normalised, a "
    "projector's outputs lie in its kept subspace).",
)
@output_options
def verify(
    filter_path: str | None,
    model: str | None,
    revision: str | None,
    tensor_name: str | None,
    vectors_path: str | None,
    json_: bool,
) -> None:
    """Check a filter's integrity and, with --model, that it belongs to that model.

    \b
    Checks: the file is a readable artifact of a known format version whose metadata (sizes, band)
    agrees with its tensors' shapes; the projection matches its
    stored SHA-256; its rows are orthonormal (float32 tolerance) and orthogonal to the removed
    directions; a centred filter's mean matches its stored SHA-256 (and its record of how it was
    made is complete and names the filter's own W_U); with --model, the model's W_U has the SHA-256
    stored at fit time.
    Exit status 0 when every check passes, 1 otherwise (the report still goes to stdout when the
    file could be read; an unreadable file gets only the error line).

    \b
    Examples:
      embfilter verify                                  # the newest filter in ./artifacts
      embfilter verify artifacts/qwen2-7b-top256.safetensors --model qwen2-7b
      embfilter verify F --model ./my-llama --json
      embfilter verify F --vectors out/                 # every output file made by F?

    Vectors filtered by different filters live in different bases: an index built with one filter
    cannot be queried with vectors filtered by another. Verify both against the same model and
    compare their projection SHA-256s.
    """
    from embfilter_cli.console import info
    from embfilter_cli.errors import ArtifactError
    from embfilter_cli.filters.artifact import load_artifact, newest_artifact
    from embfilter_cli.filters.checks import integrity_checks, unembedding_check

    path: str | Path
    if filter_path is None:
        newest = newest_artifact()
        info(f"Filter: {newest} (the newest in {newest.parent}/)")
        path = newest
    else:
        path = filter_path
    artifact = load_artifact(path, verify_digest=False)  # the digest is checked below, with both hashes reported
    checks = integrity_checks(artifact)
    model_info = None
    if model is not None:
        from embfilter_cli.model.locate import resolve_model

        location = resolve_model(model, revision=revision, tensor_name=tensor_name)
        info(f"Model: {location.source} ({location.kind.replace('_', ' ')})")
        check, model_info = unembedding_check(artifact, location, model, tensor_name)
        checks.append(check)
    if vectors_path is not None:
        from embfilter_cli.vectors.fingerprints import vectors_check

        checks.append(vectors_check(artifact, vectors_path))
    if json_:
        from embfilter_cli.console import emit_json

        emit_json(
            {
                "filter": str(artifact.path),
                "ok": all(c.ok for c in checks),
                "checks": [{k: v for k, v in asdict(c).items() if k != "error"} for c in checks],
                "model": model_info,
                "artifact": artifact.summary(),
            }
        )
    else:
        _print_report(artifact, checks)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ArtifactError(failed[0].error)


def _print_report(artifact: Any, checks: list[Any]) -> None:
    from embfilter_cli.console import key_value_table, print_table, styled

    band = artifact.band
    table = key_value_table()
    table.add_row("filter", str(artifact.path))
    table.add_row("model", f"{artifact.model_source} ({artifact.metadata.get('tensor_name')})")
    table.add_row(
        "band",
        f"remove top {band['top']}, keep {band['start']}..{band['start'] + band['keep'] - 1}, "
        f"remove bottom {band['bottom']}",
    )
    table.add_row("sha256(W_U)", artifact.unembedding_sha256)
    for check in checks:
        mark = styled("OK", "green") + "  " if check.ok else styled("FAIL", "red")
        table.add_row(check.name, mark + " " + check.detail)  # the detail stays literal
    print_table(table)
