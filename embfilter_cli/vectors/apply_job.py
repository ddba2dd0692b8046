"""The facts of one `apply` run on a vector file or stream: messages, provenance, dtype choice, summary.

The command (`commands/apply.py`) parses options and prints; the streaming itself is
`vectors.stream.filter_stream`. This module holds what is decided in between, with no I/O:
the dimension-mismatch hint, the provenance written into outputs, the output dtype and the summary.

Not handled: Parquet/Arrow jobs (`vectors.tables` and `commands/_tables.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embfilter_cli.errors import UsageError

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.vectors.stream import FilterStats


def dim_context(artifact: FilterArtifact) -> str:
    """The end of a dimension-mismatch message: what the filter expects and what to do."""
    return (
        f"the filter expects {artifact.hidden_size} (fitted on {artifact.model_source or 'another model'}); "
        "use a filter fitted on the model that produced these vectors"
    )


def provenance(artifact: FilterArtifact, normalize: bool) -> dict[str, str]:
    """String metadata naming the filter that made the vectors (formats that store metadata keep it).

    An index is only comparable with queries filtered the same way, so the output records it.
    """
    facts = {
        "embfilter.projection_sha256": artifact.metadata.get("projection_sha256", ""),
        "embfilter.model_source": artifact.model_source,
        "embfilter.unembedding_sha256": artifact.unembedding_sha256,
        "embfilter.normalized": "true" if normalize else "false",
    }
    if artifact.centered:  # P alone does not name the map: two means give two incomparable indexes
        facts["embfilter.mean_sha256"] = artifact.metadata["mean_sha256"]
    return facts


def output_dtype(requested: str | None, input_dtype: str, out_format: str, note: Callable[[str], None]) -> str:
    """The dtype to write: --dtype, else the input's (float32 with a `note` when the format lacks bfloat16)."""
    if requested == "bfloat16" and out_format != "safetensors":
        raise UsageError(f"{out_format} cannot store bfloat16; use --to safetensors or another --dtype")
    if requested:
        return requested
    if input_dtype == "bfloat16" and out_format != "safetensors":
        note(f"{out_format} cannot store bfloat16: writing float32 (pass --dtype to choose)")
        return "float32"
    return input_dtype


def summary(
    stats: FilterStats,
    artifact: FilterArtifact,
    input_path: str,
    output: str,
    in_format: str,
    out_format: str,
    normalize: bool,
) -> dict[str, Any]:
    """The run's summary (the `--json` object)."""
    return {
        "input": "stdin" if input_path == "-" else input_path,
        "output": "stdout" if output == "-" else output,
        "filter": str(artifact.path),
        "projection_sha256": artifact.metadata.get("projection_sha256"),
        "mean_sha256": artifact.metadata.get("mean_sha256") if artifact.centered else None,
        "input_format": in_format,
        "output_format": out_format,
        "rows": stats.rows,
        "input_dim": stats.input_dim,
        "output_dim": stats.output_dim,
        "input_dtype": stats.input_dtype,
        "output_dtype": stats.output_dtype,
        "normalized": normalize,
        "nonfinite_rows": stats.nonfinite_rows,
        "seconds": round(stats.seconds, 4),
        "rows_per_second": round(stats.rows_per_second, 1) if stats.rows else 0.0,
    }


def summary_line(stats: FilterStats, normalize: bool, output_name: str) -> str:
    """The one-line human summary."""
    return (
        f"Filtered {stats.rows:,} vectors {stats.input_dim} → {stats.output_dim} dims ({stats.output_dtype}"
        f"{', L2-normalised' if normalize else ''}) in {stats.seconds:.2f} s"
        + (f" ({stats.rows_per_second:,.0f} rows/s)" if stats.rows else "")
        + f" → {output_name}"
    )
