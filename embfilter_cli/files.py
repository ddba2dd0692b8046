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
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from embfilter_cli.errors import EmbfilterError, OutputExistsError
from embfilter_cli.signals import raise_if_signalled


class OutputWriteError(EmbfilterError):
    """The output could not be written (read-only folder, disk full, permissions).

    `reason` is the short cause ("the disk is full", "… is not writable") for callers that word
    their own message, such as a cache that warns and goes on.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def exists_error(out: Path) -> OutputExistsError:
    """The error for an output that exists while --force is off."""
    return OutputExistsError(f"{out} already exists; pass --force to overwrite it or choose another -o path")


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file is too large for the file system",
}


def write_error(out: Path, exc: OSError) -> OutputWriteError:
    """One line for an OSError met while writing `out` (names the user's path, never the temp file)."""
    reason = _REASONS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    advice = (
        "free space or choose another -o path"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else "choose another -o path"
    )
    return OutputWriteError(f"could not write {out}: {reason}; nothing was written, {advice}", reason)


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
    check_folder_writable(out.parent, out)
    return out


def check_folder_writable(folder: Path, out: Path) -> None:
    """Fail unless `folder`, or the nearest folder above it that exists, can take new entries for `out`."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        reason = f"{folder} is not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        reason = f"{folder} is not writable"
    else:
        return
    raise OutputWriteError(f"could not write {out}: {reason}; choose another -o path", reason)


def check_folder_output(
    out: Path,
    force: bool,
    *,
    what: str,
    marker: str,
    ours: Callable[[Path], bool],
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Refuse a folder output that may not be written or replaced, before any work.

    The replace-only-our-own rule: a non-empty folder is replaced (with `force`) only when `ours`
    recognises it as an earlier output of the same kind (by `marker`, e.g. its `embfilter.json`),
    and never when it holds one of the job's `inputs` (the filter, the model folder). The current
    folder (or one above it) is never a folder output: it cannot be renamed away.

    Args:
        out: the folder to write.
        force: --force.
        what: words for the output in messages ("a sentence-transformers model").
        marker: what `ours` looks for, for the message ("embfilter.json").
        ours: whether an existing folder is an earlier output of this kind.
        inputs: paths the job reads; a folder holding any of them is never replaced.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; {what} is a folder, give a folder path with -o")
    real = Path(os.path.realpath(out))
    if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        raise OutputExistsError(
            f"-o {out} is the current folder (or holds it); {what} is written as a folder of its own: name a new one"
        )
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(
                f"{out} already exists and is not empty; pass --force to replace an earlier export there, or choose "
                "another -o folder"
            )
        for item in inputs:
            item_real = Path(os.path.realpath(item))
            if item_real == real or real in item_real.parents:
                raise OutputExistsError(
                    f"-o {out} holds {item}, which this export reads; --force never deletes inputs: choose another -o "
                    "folder"
                )
        if not ours(out):
            raise OutputExistsError(
                f"{out} is not an earlier export of {what} (it has no {marker}); --force replaces only what an "
                "earlier export made: remove it yourself or choose another -o folder"
            )
    check_folder_writable(out.parent, out)  # built beside its final place
    if out.is_dir():  # --force into an existing folder replaces files inside it
        check_folder_writable(out, out)


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
        raise_if_signalled()  # a stop signal swallowed while writing must not publish the file
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
        reported = _reported(exc, out, tmp, writing)
        if reported is exc:
            raise
        raise reported from exc


@contextlib.contextmanager
def parents_made(out: Path) -> Iterator[list[Path]]:
    """Create `out`'s missing folders for a block that writes files into them; removed again if it fails.

    For writers whose side files (ONNX external data, links to a host's data) are undone after the
    output's own `atomic_path` has already given up on its folders: the folders go last.
    """
    try:
        made = make_parents(out.parent)
    except OSError as exc:
        raise write_error(out, exc) from exc
    try:
        yield made
    except BaseException:
        remove_empty(made)
        raise


@contextlib.contextmanager
def temp_dir_beside(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to the folder output `out`, for a writer that builds it whole.

    The caller renames it (or its files) into place. Whatever happens, the temporary folder is
    removed at the end; on failure so are the parent folders created for it. An OSError while
    writing (disk full, read-only folder) becomes one OutputWriteError naming `out`, and an
    EmbfilterError that names the temporary folder is told with `out` instead.
    """
    made: list[Path] = []
    tmp: Path | None = None
    writing = True
    try:
        made = make_parents(out.parent)
        with signals_deferred():  # a signal between creating the folder and noting it would orphan it
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        writing = False
        yield tmp
    except BaseException as exc:
        named, tmp = tmp, None
        if named is not None:
            shutil.rmtree(named, ignore_errors=True)
        remove_empty(made)
        reported = _reported(exc, out, named, writing)
        if reported is exc:
            raise
        raise reported from exc
    finally:
        if tmp is not None:  # gone already when it was renamed into place
            shutil.rmtree(tmp, ignore_errors=True)


def _reported(exc: BaseException, out: Path, tmp: Path | None, writing: bool) -> BaseException:
    """What to raise for `exc` met while writing `out` through the temporary `tmp` (`exc` itself if nothing better).

    OSErrors of writing become one OutputWriteError; a known error whose message names the
    temporary file (a checker or loader run on it) names the user's path instead.
    """
    os_error = exc if isinstance(exc, OSError) else _wrapped_os_error(exc)
    if os_error is not None and os_error.errno is None and _SHORT_WRITE.search(str(os_error)):
        # numpy's tofile (np.save) reports a write the device cut short without an errno:
        # "260608 requested and 16352 written" is a full disk (or quota).
        os_error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if os_error is not None and (writing or os_error.errno in _WRITE_ERRNOS):
        return write_error(out, os_error)
    if isinstance(exc, EmbfilterError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = _untemp(exc.args[0], out, tmp)
        if message != exc.args[0]:
            with contextlib.suppress(TypeError):
                return type(exc)(message)
    return exc


_SHORT_WRITE = re.compile(r"\b\d+ requested and \d+ written\b")
_TEMP_NAME = re.compile(r"(?P<dir>[^\s'\"]*/)?\.(?P<name>[^/\s'\"]+?)\.[A-Za-z0-9_]{6,}\.tmp\b")


def _untemp(message: str, out: Path, tmp: Path | None) -> str:
    """`message` with the temporary file's path or name (`.NAME.xxxxxx.tmp`) replaced by the user's."""
    if tmp is not None:
        message = message.replace(str(tmp), str(out)).replace(tmp.name, out.name)
    return _TEMP_NAME.sub(lambda m: (m.group("dir") or "") + m.group("name"), message)


def unwritable_reason(exc: BaseException) -> str | None:
    """Why `exc` means a place cannot be written (disk full, read-only, no permission), or None.

    For optional writes (caches, memos) that warn and go on instead of failing the run.
    """
    if isinstance(exc, OutputWriteError):
        return exc.reason
    os_error = exc if isinstance(exc, OSError) else _wrapped_os_error(exc)
    if os_error is None or os_error.errno not in _REASONS:
        return None
    return _REASONS[os_error.errno or 0]


def _wrapped_os_error(exc: BaseException) -> OSError | None:
    """The OSError inside a writer library's own exception (safetensors reports `(os error 28)`)."""
    if not isinstance(exc, Exception):
        return None
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(match.group(1)), os.strerror(int(match.group(1)))) if match else None
