"""Where the library's log lines, warnings and progress go.

The library never prints: every function that has something to say takes `hooks`. Without them,
lines go to the standard `logging` logger named "embfilter" (info, and warning for warnings) and no
progress bar is drawn. The CLI passes hooks that write to its stderr console instead, so a command
and the library call it wraps say the same things.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

LOGGER = logging.getLogger("embfilter")

Progress = Callable[[int, int], None]  # (units done, units total)
BarFactory = Callable[[str, int], contextlib.AbstractContextManager[Any]]  # (description, total) -> Progress | None


@contextlib.contextmanager
def no_bar(description: str, total: int) -> Iterator[None]:
    """A progress-bar factory that draws nothing (the library's default)."""
    yield None


@dataclass(frozen=True)
class Hooks:
    """Callbacks for what a long call reports: `info` lines, `notice` lines (a long wait the user did not
    ask for, such as building the model cache), `warn` lines, and `bar(description, total)`, a context
    manager that yields a `(done, total)` progress callback or None; `downloads` lets huggingface_hub
    draw its own download bars."""

    info: Callable[[str], None] = LOGGER.info
    notice: Callable[[str], None] = LOGGER.info
    warn: Callable[[str], None] = LOGGER.warning
    bar: BarFactory = no_bar
    downloads: bool = False  # let huggingface_hub draw its own download bars


QUIET = Hooks()


def hooks_or_default(hooks: Hooks | None) -> Hooks:
    """`hooks`, or the logging defaults when None."""
    return QUIET if hooks is None else hooks


__all__ = ["LOGGER", "QUIET", "BarFactory", "Hooks", "Progress", "hooks_or_default", "no_bar"]
