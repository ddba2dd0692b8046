"""`embfilter inspect`: what the unembedding's directions write, and what a filter removes.

Subcommands: `text` (logit lens on pooled text embeddings, before/after a filter), `directions`
(top tokens of singular directions with English word frequencies, summarised per band) and
`spectrum` (the singular values with the band marked). Bare `embfilter inspect` shows the
removed directions of the newest artifact in ./artifacts, else of the default model with the
top 64 removed.

This module holds the group; each subcommand is its own module (`inspect_directions`,
`inspect_text`, `inspect_spectrum`; shared options and loading in `_inspect_common`). Only click
is imported at start-up; the work happens in `embfilter_cli.text` (`inspect_target`,
`directions`, `lens`, `tokens`) and `embfilter_cli.filters.solve`.
"""

from __future__ import annotations

import click

from embfilter_cli.commands._options import output_options
from embfilter_cli.commands.inspect_directions import directions
from embfilter_cli.commands.inspect_spectrum import spectrum
from embfilter_cli.commands.inspect_text import text
from embfilter_cli.text.directions import DEFAULT_RANK


@click.group(name="inspect", invoke_without_command=True)
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Tokens per direction and sign.")
@output_options
@click.pass_context
def inspect_group(ctx: click.Context, top: int, json_: bool) -> None:
    """See what W_U's singular directions write and what a filter removes.

    \b
    Without a subcommand: the removed directions of the newest filter in ./artifacts, or of the
    default model with the top 64 directions removed when there is none.

    \b
    Examples:
      embfilter inspect
      embfilter inspect text --model smollm2-135m "The cat sat on the mat." --filter F
      embfilter inspect directions --model smollm2-135m --band 0:8 --top 12
      embfilter inspect directions --filter F --removed --json
      embfilter inspect spectrum --model smollm2-135m --rank 64 --bottom 16 --plot spectrum.png
    """
    if ctx.invoked_subcommand is not None:
        return
    from embfilter_cli.console import info
    from embfilter_cli.errors import ArtifactError, ModelNotFoundError
    from embfilter_cli.filters.artifact import DEFAULT_ARTIFACT_DIR, newest_artifact
    from embfilter_cli.model.locate import resolve_model

    try:
        newest = newest_artifact()
    except ArtifactError:
        newest = None
    if newest is not None:
        info(f"Newest filter in {DEFAULT_ARTIFACT_DIR}/: {newest}")
        ctx.invoke(directions, filter_=str(newest), removed=True, top=top, json_=json_)
        return
    try:
        resolve_model(None)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"no filter in {DEFAULT_ARTIFACT_DIR}/ and no default model: {exc}; or run "
            "`embfilter inspect directions --model SPEC`"
        ) from exc
    info(
        f"No filter in {DEFAULT_ARTIFACT_DIR}/; showing the default model with the top {DEFAULT_RANK} directions removed"
    )
    ctx.invoke(directions, removed=True, top=top, json_=json_)


inspect_group.add_command(directions)
inspect_group.add_command(text)
inspect_group.add_command(spectrum)
