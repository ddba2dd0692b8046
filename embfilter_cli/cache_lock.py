"""Who is using a cache entry: advisory locks, last-use markers, and leftovers of killed builders.

Every entry of the embfilter cache (`cache_store.py` lists them) is one file or folder,
`<root>/<kind>/<name>`. Next to the kinds' folders the cache keeps two hidden ones:

    .locks/<kind>/<name>.lock   flock(2) target of the entry: builders hold it exclusively while
                                they build; a process that loaded the entry holds it shared until
                                it exits; `cache prune` and the size limit delete an entry only
                                while they hold it exclusively (taken without waiting: a busy
                                entry is skipped, never waited for)
    .used/<kind>/<name>         empty marker whose mtime is the entry's last use (one utime per
                                cache hit: cheap, atomic, and it never touches the entry's own files,
                                whose stat the GGUF memo trusts)

flock locks die with their process (also under `kill -9`), so a crashed run never leaves an entry
locked. A lock file may be deleted by whoever holds it exclusively (pruning removes it with its
entry); `acquire` therefore checks, once it holds the lock, that the path still names the file it
locked, and starts again otherwise.

Leftovers: a builder names its temporary folder `.<name>.<pid>.<random>.tmp` and builds it while
holding the entry's lock. `stale_temporaries` reports those whose entry lock is free and whose pid
is no longer alive, so the next run removes what a killed conversion left (up to the model's size).

Which entries are held while in use: GGUF conversions (a model loads from the folder's files).
Single-file entries (eval embeddings and spectra, self-generated texts) are read whole in one go
and replaced atomically, so removing one under a reader cannot break it (POSIX keeps an open file's
data); they are not held.

Not handled: the instant between a builder's exclusive lock and its shared hold (`hold_downgraded`:
flock converts a lock by releasing it first), when a `cache prune --all` could take the entry;
lock files and markers of entries deleted by hand (a few bytes each, never read again); network
file systems without flock (a prune there stops with an error instead of deleting unlocked), Windows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

LOCKS = ".locks"
USED = ".used"

# Shared locks this process holds on entries it loaded: kept open until exit (the OS drops them).
_held: dict[Path, int] = {}


def _relative(root: Path, entry: Path) -> Path:
    """`<kind>/<name>` of the entry `<root>/<kind>/<name>`."""
    return Path(entry).relative_to(root)


def lock_path(root: Path, entry: Path) -> Path:
    """The lock file of `entry`: `<root>/.locks/<kind>/<name>.lock`."""
    rel = _relative(root, entry)
    return root / LOCKS / rel.parent / f"{rel.name}.lock"


def marker_path(root: Path, entry: Path) -> Path:
    """The last-use marker of `entry`: `<root>/.used/<kind>/<name>`."""
    return root / USED / _relative(root, entry)


def acquire(path: Path, shared: bool, wait: bool) -> int | None:
    """An open descriptor holding flock on `path` (created if missing), or None if busy and not waiting.

    Raises OSError when the lock file cannot be created (read-only or full cache).
    """
    import fcntl

    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:
            continue  # another process removed the empty lock folder just now (`forget(tidy=True)`)
        try:
            fcntl.flock(fd, mode)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder before us pruned the entry and deleted this lock file: lock the new one


@contextlib.contextmanager
def locked(root: Path, entry: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold `entry`'s lock for the block; yields False (lock not held) when `wait` is off and it is busy.

    Raises OSError when the lock file cannot be created.
    """
    fd = acquire(lock_path(root, entry), shared, wait)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def hold_shared(root: Path, entry: Path) -> None:
    """Keep a shared lock on `entry` until this process exits (or `release`), so no prune removes it.

    Best effort: a cache whose lock file cannot be created (read-only) is not pruned by this
    process either; waits while a builder holds the entry exclusively.
    """
    key = lock_path(root, entry)
    if key in _held:
        return
    with contextlib.suppress(OSError):
        fd = acquire(key, shared=True, wait=True)
        if fd is not None:
            _held[key] = fd


def hold_downgraded(root: Path, entry: Path, fd: int) -> None:
    """Turn an exclusive lock a builder holds on `fd` into the shared hold of `hold_shared` (keeps `fd`)."""
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_SH)
    key = lock_path(root, entry)
    old = _held.pop(key, None)
    if old is not None:
        os.close(old)
    _held[key] = fd


def release(root: Path, entry: Path) -> None:
    """Drop this process's hold on `entry` (for long-lived processes and tests)."""
    fd = _held.pop(lock_path(root, entry), None)
    if fd is not None:
        os.close(fd)


def in_use(root: Path, entry: Path) -> bool:
    """Whether a process holds `entry`'s lock right now (this one's `hold_shared` counts: it loaded the entry)."""
    import fcntl

    path = lock_path(root, entry)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False  # every holder creates the lock file before locking it
    except OSError:
        return True  # unreadable: treat as in use, never delete blind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while any other process holds it, shared or not
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def mark_used(root: Path, entry: Path) -> None:
    """Record that `entry` was used now (touch its marker); best effort, never fails the caller."""
    marker = marker_path(root, entry)
    with contextlib.suppress(OSError):
        try:
            os.utime(marker)
        except FileNotFoundError:
            marker.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o666))


def last_used(root: Path, entry: Path) -> float | None:
    """When `entry` was last used (epoch seconds), or None when no use was recorded."""
    try:
        return marker_path(root, entry).stat().st_mtime
    except OSError:
        return None


def forget(root: Path, entry: Path, tidy: bool = False) -> None:
    """Remove `entry`'s marker and lock file (call while holding its lock exclusively, after deleting it).

    `tidy`: also remove the hidden folders that held them when they are left empty.
    """
    for path in (marker_path(root, entry), lock_path(root, entry)):
        with contextlib.suppress(OSError):
            path.unlink()
        if tidy:
            for folder in (path.parent, path.parent.parent):
                with contextlib.suppress(OSError):
                    folder.rmdir()


# --------------------------------------------------------------------------- leftovers


def temp_prefix(name: str) -> str:
    """The start of a builder's temporary folder name for entry `name` (`tempfile.mkdtemp(prefix=...)`)."""
    return f".{name}.{os.getpid()}."


# .<name>.<pid>.<random>.tmp (builders), or .<name>.damaged-<pid>-<ns> (an entry being discarded)
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp|damaged-(?P<dpid>\d+)-\d+)$")
# .<name>.<random>.tmp: `files.atomic_path` and builders before the pid was in the name
_OLD_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
OLD_TEMP_AGE = 24 * 3600.0  # a pid-less leftover older than this has no live builder


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(root: Path, kind: str) -> list[Path]:
    """Hidden leftovers of killed builders in `<root>/<kind>` that no live process owns.

    A leftover is stale when its entry's lock is free and the pid in its name is not alive (a
    pid-less name from an older version: when it is also older than a day).
    """
    folder = root / kind
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    stale = []
    for child in children:
        match = _TEMP.match(child.name)
        if match is not None:
            pid = int(match.group("pid") or match.group("dpid"))
            if pid == os.getpid() or pid_alive(pid):
                continue
        else:
            match = _OLD_TEMP.match(child.name)
            try:
                if match is None or time.time() - child.lstat().st_mtime < OLD_TEMP_AGE:
                    continue
            except OSError:
                continue
        if not in_use(root, folder / match.group("name")):
            stale.append(child)
    return stale


def remove_path(path: Path) -> None:
    """Delete a file or folder (not following symlinks); missing is fine."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(root: Path, kind: str) -> int:
    """Remove `stale_temporaries(root, kind)`; returns the bytes freed."""
    freed = 0
    for path in stale_temporaries(root, kind):
        freed += tree_bytes(path)
        remove_path(path)
    return freed


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (apparent sizes; links are not followed)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total
