"""The library's `Hooks` wired to the CLI's stderr console: what a command's library call says is printed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embfilter_cli.api.hooks import Hooks


def console_hooks() -> Hooks:
    """Info/notice/warning lines and progress bars on stderr, as `-q`/`-v` and the terminal allow."""
    from embfilter_cli.api.hooks import Hooks
    from embfilter_cli.console import info, notice, progress_bar, progress_enabled, warn

    return Hooks(info=info, notice=notice, warn=warn, bar=progress_bar, downloads=progress_enabled())
