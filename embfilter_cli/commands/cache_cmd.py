"""`embfilter cache`: list what the cache holds, and prune it.

`embfilter cache` (or `cache ls`) prints every entry (kind, source, size, created, last used, in
use) and the total; `cache prune` removes by age, by size or everything, never an entry another
process holds. The work is in `embfilter_cli.cache_store`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from embfilter_cli.commands._options import output_options

if TYPE_CHECKING:
    from embfilter_cli.cache_store import Pruned

_CACHE_DIR_HELP = "The cache folder (default: $EMBFILTER_CACHE, else ~/.cache/embfilter)."


def _root(cache_dir: str | None) -> Path:
    """The cache folder: this command's --cache-dir, else the group's (`cache --cache-dir D prune`), else the default."""
    from embfilter_cli.cache_store import check_root
    from embfilter_cli.files import default_cache_dir

    parent = click.get_current_context().parent
    if cache_dir is None and parent is not None:
        cache_dir = parent.params.get("cache_dir")
    return check_root(Path(cache_dir) if cache_dir else default_cache_dir())


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _limit_text() -> str:
    from embfilter_cli.cache_store import MAX_SIZE_ENV, human_size, max_size

    limit = max_size()
    return f"no limit ({MAX_SIZE_ENV}=0)" if limit is None else f"limit {human_size(limit)} ({MAX_SIZE_ENV})"


@click.group(name="cache", invoke_without_command=True)
@click.option("--cache-dir", type=click.Path(), default=None, help=_CACHE_DIR_HELP)
@output_options
@click.pass_context
def cache_group(ctx: click.Context, cache_dir: str | None, json_: bool) -> None:
    """List the cache (converted GGUF models, eval embeddings and spectra, self-generated texts) or prune it.

    \b
    Without a subcommand: the same as `embfilter cache ls`.
    The cache keeps at most $EMBFILTER_CACHE_MAX_SIZE (default 20GB; 0 = no limit): after each new
    entry the least recently used go, conversions of other transformers versions first.

    \b
    Examples:
      embfilter cache
      embfilter cache ls --json
      embfilter cache prune --older-than 30d --dry-run
      embfilter cache prune --max-size 5GB
      embfilter cache prune --all
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(ls, cache_dir=cache_dir, json_=json_)


@cache_group.command(name="ls")
@click.option("--cache-dir", type=click.Path(), default=None, help=_CACHE_DIR_HELP)
@output_options
def ls(cache_dir: str | None, json_: bool) -> None:
    """List every cached entry with its source, size, kind, creation and last use, and the total."""
    from embfilter_cli.cache_store import human_size, list_entries, max_size

    root = _root(cache_dir)
    entries = list_entries(root)
    total = sum(e.bytes for e in entries)
    parent = click.get_current_context().parent
    if parent is not None and parent.params.get("json_"):
        json_ = True  # `embfilter cache --json ls`
    if json_:
        from embfilter_cli.console import emit_json

        emit_json(
            {
                "cache": str(root),
                "entries": [e.as_dict() for e in entries],
                "total_bytes": total,
                "max_size_bytes": max_size(),
            }
        )
        return
    from embfilter_cli.console import Column, DataTable, out_text, print_table

    if entries:
        table = DataTable(
            [Column("kind"), Column("source"), Column("size", justify="right"), Column("created"), Column("last used")]
        )
        table.plain = True  # no box: the dates and sizes need the width of an 80-column pipe
        for e in entries:
            notes = [f"{e.detail}: goes first" if e.outdated else "", "in use" if e.in_use else ""]
            source = " ".join([e.source or "-", *(f"({n})" for n in notes if n)])
            table.add_row(e.kind.name, source, human_size(e.bytes), _when(e.created)[:10], _when(e.last_used))
        print_table(table)
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    out_text(f"Total: {count}, {human_size(total)} in {root}; {_limit_text()}")


@cache_group.command(name="prune")
@click.option("--older-than", metavar="AGE", default=None, help="Remove entries unused for AGE (e.g. 30d, 12h, 2w).")
@click.option(
    "--max-size",
    metavar="SIZE",
    default=None,
    help="Remove least recently used entries (other transformers versions first) until the rest fits in SIZE "
    "(e.g. 20GB, 500MB).",
)
@click.option("--all", "all_", is_flag=True, help="Remove every entry not in use.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--cache-dir", type=click.Path(), default=None, help=_CACHE_DIR_HELP)
@output_options
def prune(
    older_than: str | None, max_size: str | None, all_: bool, dry_run: bool, cache_dir: str | None, json_: bool
) -> None:
    """Remove cached entries by age, by size or all; entries in use by another process are kept.

    Also removes what killed conversions left behind.
    """
    from embfilter_cli.cache_store import parse_age, parse_size
    from embfilter_cli.cache_store import prune as prune_cache
    from embfilter_cli.errors import UsageError

    if all_ and (older_than or max_size):
        raise UsageError("--all removes everything; leave out --older-than and --max-size, or --all")
    if not (all_ or older_than or max_size):
        raise UsageError("say what to remove: --older-than AGE, --max-size SIZE or --all")
    age = parse_age(older_than) if older_than else None
    size = parse_size(max_size) if max_size is not None else None
    root = _root(cache_dir)
    done = prune_cache(root, older_than=age, max_bytes=size, everything=all_, dry_run=dry_run)
    _report(root, done, dry_run, json_)


def _report(root: Path, done: Pruned, dry_run: bool, json_: bool) -> None:
    from embfilter_cli.cache_store import human_size

    if json_:
        from embfilter_cli.console import emit_json

        emit_json(
            {
                "cache": str(root),
                "dry_run": dry_run,
                "removed": [e.as_dict() for e in done.removed],
                "in_use": [e.as_dict() for e in done.busy],
                "temporaries": [str(p) for p in done.temporaries],
                "freed_bytes": done.freed,
                "remaining_bytes": done.remaining,
            }
        )
        return
    from embfilter_cli.console import Column, DataTable, out_text, print_table

    verb = "would remove" if dry_run else "removed"
    rows = [(e, verb) for e in done.removed] + [(e, "kept: in use") for e in done.busy]
    if rows:
        table = DataTable([Column("kind"), Column("source"), Column("size", justify="right"), Column("")])
        table.plain = True
        for e, action in rows:
            table.add_row(e.kind.name, e.source or "-", human_size(e.bytes), action)
        print_table(table)
    left = f"{len(done.temporaries)} left by killed conversions" if done.temporaries else ""
    what = f"{len(done.removed)} entr{'y' if len(done.removed) == 1 else 'ies'}"
    out_text(
        f"{'Would remove' if dry_run else 'Removed'} {what} ({human_size(done.freed)})"
        + (f" and {left}" if left else "")
        + f"; {human_size(done.remaining)} {'would be ' if dry_run else ''}left in {root}"
        + (f"; {len(done.busy)} in use kept" if done.busy else "")
    )
