"""Shell completion scripts generated from the click app (bash, zsh, fish).

The checked-in copies under `completions/` are regenerated with
`python -m embfilter_cli.completion completions/`; a test fails when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "embfilter.bash", "zsh": "_embfilter", "fish": "embfilter.fish"}


def completion_source(shell: str) -> str:
    """The completion script click generates for `shell`."""
    from click.shell_completion import get_completion_class

    from embfilter_cli.cli import app

    cls = get_completion_class(shell)
    if cls is None:
        raise ValueError(f"unsupported shell {shell!r}; choose one of {', '.join(SHELLS)}")
    return cls(app, {}, "embfilter", "_EMBFILTER_COMPLETE").source()


def write_all(folder: Path) -> list[Path]:
    """Write the completion script of every shell into `folder`; returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        path = folder / name
        path.write_text(completion_source(shell))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(written_path)
