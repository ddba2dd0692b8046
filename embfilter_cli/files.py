"""Atomic output files: write to a temporary sibling, then publish it under its name.

An interrupted or failed run leaves neither a partial file nor a stray temporary one (nor the
folders it created for them), and an existing output is only replaced when the caller says so
(the CLI's --force). Without --force the final step is exclusive: the temporary file is
hard-linked to its name, which fails if the name exists, so of two concurrent runs writing the
same output exactly one wins and the other reports that the file exists.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embfilter_cli.errors import EmbfilterError, OutputExistsError


class OutputWriteError(EmbfilterError):
    """The output could not be written (read-only folder, disk full, permissions)."""


def exists_error(out: Path) -> OutputExistsError:
    """The error for an output that exists while --force is off."""
    return OutputExistsError(f"{out} already exists; pass --force to overwrite it or choose another -o path")


def write_error(out: Path, exc: OSError) -> OutputWriteError:
    """One line for an OSError met while writing `out` (names the user's path, never the temp file)."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EFBIG: "the file is too large for the file system",
    }.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return OutputWriteError(
        f"could not write {out}: {reason}; nothing was written, free space or choose another -o path"
    )


# Errors only writing can cause: reported as such even when raised inside the caller's body.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def default_cache_dir() -> Path:
    """embfilter's cache: `$EMBFILTER_CACHE`, else `~/.cache/embfilter`."""
    env = os.environ.get("EMBFILTER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "embfilter"


def check_writable(path: str | os.PathLike[str], force: bool) -> Path:
    """Fail early, before any expensive work, if `path` exists and `force` is off, or cannot be written.

    Also checks that the nearest existing folder is writable, so a read-only destination is
    reported before minutes of work rather than after.
    """
    out = Path(path)
    if (out.exists() or out.is_symlink()) and not force:
        raise exists_error(out)
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file path with -o")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputWriteError(f"could not write {out}: {folder} is not a folder; choose another -o path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputWriteError(f"could not write {out}: {folder} is not writable; choose another -o path")
    return out


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created (outermost first), for `remove_empty`."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    missing.reverse()
    for made in missing:
        with contextlib.suppress(FileExistsError):
            made.mkdir()
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove folders `make_parents` created, innermost first, if they are still empty."""
    for made in reversed(folders):
        with contextlib.suppress(OSError):
            made.rmdir()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (main thread, POSIX); elsewhere a no-op."""
    import signal
    import threading

    held = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished `tmp` to `out`: a plain rename with `force`, an exclusive one without."""
    if force:
        os.replace(tmp, out)
        return
    if tmp.is_dir():
        try:
            out.mkdir()  # exclusive claim on the name; rename then replaces the empty folder atomically
        except FileExistsError:
            raise exists_error(out) from None
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise exists_error(out) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # No hard links here (some FUSE/FAT mounts): reserve the name exclusively, then replace it.
        try:
            os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise exists_error(out) from None
        os.replace(tmp, out)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success publish it as `path` (see `publish`).

    The temporary file lives in the destination folder so the final step is atomic on POSIX
    filesystems. On any exception (including KeyboardInterrupt and the signals `cli.main` turns
    into exceptions) the temporary file and the folders created for it are removed and `path` is
    untouched. An OSError while writing (disk full, read-only folder) becomes one OutputWriteError.
    """
    out = check_writable(path, force)
    made: list[Path] = []
    tmp: Path | None = None
    writing = True  # False while the caller's body runs: its OSErrors may come from reading inputs
    try:
        made = make_parents(out.parent)
        with signals_deferred():  # a signal between creating the file and naming it would orphan it
            fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            tmp = Path(tmp_name)
            os.close(fd)
        writing = False
        yield tmp
        writing = True
        # mkstemp makes 0600 files, and writers that recreate the file keep that: give the output
        # the permissions a plain open() would have (0666 minus the umask) just before publishing it.
        umask = os.umask(0)
        os.umask(umask)
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~umask)
        with signals_deferred():  # published and tidied, or not published at all
            publish(tmp, out, force)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        remove_empty(made)
        os_error = exc if isinstance(exc, OSError) else _wrapped_os_error(exc)
        if os_error is not None and (writing or os_error.errno in _WRITE_ERRNOS):
            raise write_error(out, os_error) from exc
        raise


def _wrapped_os_error(exc: BaseException) -> OSError | None:
    """The OSError inside a writer library's own exception (safetensors reports `(os error 28)`)."""
    if not isinstance(exc, Exception):
        return None
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(match.group(1)), os.strerror(int(match.group(1)))) if match else None
