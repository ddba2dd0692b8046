"""Atomic output files: write to a temporary sibling, then rename.

An interrupted or failed run leaves neither a partial file nor a stray temporary one, and an
existing output is only replaced when the caller says so (the CLI's --force).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embfilter_cli.errors import OutputExistsError


def default_cache_dir() -> Path:
    """embfilter's cache: `$EMBFILTER_CACHE`, else `~/.cache/embfilter`."""
    env = os.environ.get("EMBFILTER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "embfilter"


def check_writable(path: str | os.PathLike[str], force: bool) -> Path:
    """Fail early, before any expensive work, if `path` exists and `force` is off."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite it or choose another -o path")
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file path with -o")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`.

    The temporary file lives in the destination folder so the final `os.replace` is atomic on
    POSIX filesystems. On any exception the temporary file is removed and `path` is untouched.
    """
    out = check_writable(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files, and writers that recreate the file keep that: give the output
        # the permissions a plain open() would have (0666 minus the umask) just before publishing it.
        umask = os.umask(0)
        os.umask(umask)
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
