"""`embfilter fit`'s helpers: --power-iters parsing and the summary table."""

from __future__ import annotations

from typing import Any

import click


def parse_power_iters(value: str) -> int | None:
    """--power-iters: None for 'auto', else a whole number of at least 1."""
    if value == "auto":
        return None
    try:
        iters = int(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither 'auto' nor a whole number", param_hint="--power-iters"
        ) from None
    if iters < 1:
        raise click.BadParameter(f"must be at least 1, got {iters}", param_hint="--power-iters")
    return iters


def print_summary(summary: dict[str, Any]) -> None:
    """The fit summary as a key/value table on stdout."""
    from embfilter_cli.console import key_value_table, print_table

    band = summary["band"]
    sig = summary["sigma"]

    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.4g}"

    table = key_value_table()
    table.add_row("model", summary["model_source"])
    table.add_row("tensor", f"{summary['tensor_name']} ({summary['vocab_rows_used']}×{summary['hidden_size']})")
    table.add_row(
        "band",
        f"remove top {band['top']}, keep {band['start']}..{band['start'] + band['keep'] - 1}, remove bottom {band['bottom']}",
    )
    table.add_row(
        "σ at edges",
        f"σ_max {fmt(summary['sigma_max'])} · last removed {fmt(sig['sigma_last_removed_top'])} · "
        f"kept {fmt(sig['sigma_first_kept'])} … {fmt(sig['sigma_last_kept'])} · first removed bottom {fmt(sig['sigma_first_removed_bottom'])}",
    )
    table.add_row("energy removed", f"{100 * summary['energy_removed']:.2f}% of ‖W_U‖²_F")
    table.add_row("output dims", f"{summary['hidden_size']} → {summary['output_dim']} ({summary['projection_kind']})")
    cert = summary["certificate"]
    detail = ", ".join(
        f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in cert.items() if k != "residual_history"
    )
    table.add_row("solver", f"{summary['solver']} in {summary['solve_seconds']:.2f}s ({detail})")
    table.add_row("sha256(W_U)", summary["unembedding_sha256"])
    if summary.get("centering"):
        c = summary["centering"]
        rec = c["centering"]
        table.add_row(
            "centred on",
            f"{rec['count']} {'embeddings' if rec['source'] != 'texts' else 'sampled texts' if rec.get('sampling') else 'texts'} from {rec['input']} "
            f"({rec['pooling']} pooling, recipe {rec['recipe']}); ‖m‖ = {c['mean_norm']:.4g}",
        )
    table.add_row("saved", summary["output"])
    print_table(table)
