"""A GGUF model converted once to a cached Hugging Face folder, so later loads skip the GGUF path.

transformers builds a model from a GGUF file by parsing the header, rebuilding the tokenizer and
dequantizing every tensor: about 45 s for the built-in SmolLM2-135M on 2 CPU cores. The folder
this module writes (float32 safetensors, config, tokenizer) loads in well under a second.

Layout under the cache root (`$EMBFILTER_CACHE`, default `~/.cache/embfilter`):

    gguf/<key>/                  the converted folder (config.json, model.safetensors, tokenizer…)
    gguf/<key>/embfilter-conversion.json   manifest: source SHA-256, converter versions, and the
                                 size and SHA-256 of every file
    gguf/<key>.verified.json     stat memo of the files as last verified (see below)
    gguf/sources/<hash>.json     stat memo of a GGUF file's SHA-256 (see below)

Key: the SHA-256 of the WHOLE GGUF file plus the conversion format version and the transformers
version (the converter decides what the folder holds). A changed GGUF file, or a new
transformers, gets a new folder.

Cost of the fingerprints: hashing the 98 MB built-in GGUF takes ~0.2 s and the 538 MB converted
weights ~1.2 s, which would dominate a 0.4 s load. Both digests are therefore memoised against the
file's (size, mtime_ns, ctime_ns, inode): any write to a file changes its ctime, which user code
cannot set back, so a matching stat means the bytes hashed last time are still there. When the stat
differs the file is hashed again: a GGUF with new content gets a new key, and a converted file that
no longer matches its manifest marks the folder damaged; it is then moved aside and rebuilt.

Atomicity: a folder is built in a temporary sibling `.<key>.<pid>.<random>.tmp` and renamed into
place only after its manifest is written and its contents were checked against the in-memory
model; a reader never sees a half-written folder. The build holds the entry's exclusive lock
(`cache_lock`): a second process converting the same file waits, then uses the first one's folder.
A conversion killed with `kill -9` leaves its temporary folder; the next conversion removes it once
its lock is free and its pid is gone. A process that loaded a folder holds it shared until it
exits, so `embfilter cache prune` and the size limit (`cache_store`) never delete it under a run.

Disk: the float32 folder is ~4 bytes per parameter (0.54 GB for the built-in model, ~28 GB for a
7B GGUF); `embfilter cache` lists the folders, the cache's size limit removes the least recently
used (old transformers versions first), `--no-cache` skips converting.

Not handled: bit rot that leaves a file's stat unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embfilter_cli import cache_lock
from embfilter_cli.cache_store import check_root, enforce_limit, human_size, max_size
from embfilter_cli.errors import ModelNotFoundError
from embfilter_cli.files import OutputWriteError, atomic_path, default_cache_dir, unwritable_reason
from embfilter_cli.jsonable import loads as json_loads
from embfilter_cli.model.gguf_to_hf import convert_with_transformers

FORMAT_VERSION = "1"
MANIFEST = "embfilter-conversion.json"
_CHUNK = 1 << 22
ConvertFn = Callable[[Path, Path], None]  # (gguf file, empty folder to fill)
NotifyFn = Callable[[str], None]


class TooLargeToConvert(Exception):
    """The float32 folder of a GGUF would take more than the caller's budget; it was not built."""

    def __init__(self, estimate: int, budget: int) -> None:
        super().__init__(f"the conversion would take {estimate} bytes, over the budget of {budget}")
        self.estimate = estimate
        self.budget = budget


@dataclass
class Converted:
    """Where the converted folder is, and whether this call built it."""

    folder: Path
    built: bool
    seconds: float  # spent converting (0.0 when the folder was already there)
    rebuilt_because: str | None = None  # why an existing folder was discarded, if one was


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds converted GGUF models: `<cache>/gguf`."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "gguf"


# --------------------------------------------------------------------------- fingerprints


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        value = json_loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else None
    return None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    # A memo that cannot be written (read-only or full cache) only costs a re-hash later.
    with contextlib.suppress(OSError, OutputWriteError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, force=True) as tmp:
            tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")


def gguf_sha256(path: Path, root: Path) -> str:
    """The whole file's SHA-256, memoised against its stat (see module docstring)."""
    path = path.resolve()
    memo = root / "sources" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    stat = _stat_key(path)
    known = _read_json(memo)
    if known and known.get("path") == str(path) and known.get("stat") == stat and isinstance(known.get("sha256"), str):
        return known["sha256"]
    sha = file_sha256(path)
    if _stat_key(path) == stat:  # not being written while we read it
        _write_json(memo, {"path": str(path), "stat": stat, "sha256": sha})
    return sha


def conversion_key(gguf_sha: str) -> str:
    """Folder name for a GGUF file's conversion: its SHA-256 plus the converter's versions."""
    import transformers

    payload = json.dumps({"format": FORMAT_VERSION, "gguf_sha256": gguf_sha, "transformers": transformers.__version__})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _manifest(folder: Path, gguf_path: Path, gguf_sha: str) -> dict[str, Any]:
    import transformers

    files = {
        f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    return {
        "format": f"embfilter.gguf-conversion/{FORMAT_VERSION}",
        "gguf_name": gguf_path.name,
        "gguf_sha256": gguf_sha,
        "transformers": transformers.__version__,
        "files": files,
    }


def verify_folder(folder: Path, gguf_sha: str) -> str | None:
    """None when `folder` is a complete conversion of the GGUF with SHA-256 `gguf_sha`, else why not.

    Files whose stat matches the memo written at the last verification are trusted; the others are
    hashed again and compared with the manifest.
    """
    manifest = _read_json(folder / MANIFEST)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable"
    files = manifest.get("files")
    if manifest.get("gguf_sha256") != gguf_sha or not isinstance(files, dict) or not files:
        return f"{MANIFEST} describes another file"
    memo_path = folder.with_name(folder.name + ".verified.json")
    memo = _read_json(memo_path) or {}
    present = {f.name for f in folder.iterdir() if f.is_file() and f.name != MANIFEST}
    if present != set(files):
        missing = sorted(set(files) - present)
        return f"files missing: {', '.join(missing)}" if missing else "unexpected files"
    stats: dict[str, list[int]] = {}
    changed = False
    for name, entry in files.items():
        path = folder / name
        stat = _stat_key(path)
        stats[name] = stat
        if memo.get(name) == stat:
            continue
        if stat[0] != entry.get("size"):
            return f"{name} has {stat[0]} bytes, expected {entry.get('size')}"
        if file_sha256(path) != entry.get("sha256"):
            return f"{name} does not match its SHA-256"
        changed = True
    if changed or set(memo) != set(files):
        _write_json(memo_path, stats)
    return None


# --------------------------------------------------------------------------- conversion


def converted_folder(
    gguf_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    convert: ConvertFn | None = None,
    notify: NotifyFn | None = None,
    budget: int | None = None,
) -> Converted:
    """The cached Hugging Face folder for `gguf_path`, converting (or rebuilding) it when needed.

    The folder is returned with a shared lock this process keeps until it exits, so no prune
    removes it while the model loads (`cache_lock`). A conversion runs under the exclusive lock:
    a second process that wants the same folder waits for it instead of converting again. After a
    new folder, the cache's size limit is enforced (`cache_store.enforce_limit`).

    Args:
        gguf_path: the GGUF file.
        cache_dir: the embfilter cache (default `$EMBFILTER_CACHE` or `~/.cache/embfilter`).
        convert: fills an empty folder from the GGUF file (default `convert_with_transformers`).
        notify: called with one-line messages worth showing a user (conversion started, a damaged
            folder being rebuilt, leftovers or old entries removed); the core never prints.
        budget: when set, a folder that must be built and whose `conversion_bytes` exceed it is not:
            `TooLargeToConvert` is raised instead (an existing folder is used whatever its size).
    """
    source = Path(gguf_path)
    cache = check_root(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    max_size()  # a bad $EMBFILTER_CACHE_MAX_SIZE is reported before minutes of converting
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    freed = cache_lock.remove_stale_temporaries(cache, root.name)
    if freed and notify:
        notify(f"Removed {human_size(freed)} left in {root} by a conversion that was killed")
    sha = gguf_sha256(source, root)
    folder = root / conversion_key(sha)
    cache_lock.hold_shared(cache, folder)  # waits while another process converts this file
    if folder.is_dir() and verify_folder(folder, sha) is None:
        cache_lock.mark_used(cache, folder)
        return Converted(folder, built=False, seconds=0.0)
    cache_lock.release(cache, folder)
    estimate = conversion_bytes(source) if budget is not None else None
    if estimate is not None and budget is not None and estimate > budget:
        raise TooLargeToConvert(estimate, budget)
    fd = _build_lock(cache, folder)
    try:
        built = _build(source, sha, folder, convert, notify)
    except BaseException:
        if fd is not None:  # nothing was built: leave no lock file either (a full disk stays as it was)
            cache_lock.forget(cache, folder, tidy=True)
            os.close(fd)
        raise
    if fd is not None:
        cache_lock.hold_downgraded(cache, folder, fd)
    cache_lock.mark_used(cache, folder)
    if built.built:
        enforce_limit(cache, folder, notify)
    return built


def _build_lock(cache: Path, folder: Path) -> int | None:
    """The exclusive lock on `folder` for building it, waited for; None where flock is unavailable."""
    try:
        return cache_lock.acquire(cache_lock.lock_path(cache, folder), shared=False, wait=True)
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None  # a file system without locks: concurrent builders still end in one folder (rename)
        raise


def _build(source: Path, sha: str, folder: Path, convert: ConvertFn | None, notify: NotifyFn | None) -> Converted:
    """Convert `source` into `folder` (caller holds its lock), unless another process just did."""
    root = folder.parent
    reason = None
    if folder.is_dir():
        reason = verify_folder(folder, sha)
        if reason is None:  # converted by the process we waited for
            return Converted(folder, built=False, seconds=0.0)
        if notify:
            notify(f"The cached conversion {folder} is damaged ({reason}); rebuilding it")
        _discard(folder)
    elif folder.exists():
        reason = "not a folder"
        _discard(folder)
    if notify:
        notify(
            f"Converting {source.name} once to a Hugging Face folder in {folder} (later loads take about a second; "
            "--no-cache skips this)"
        )
    start = time.perf_counter()
    # The pid in the name lets a later run tell a killed conversion's leftover from a live one.
    tmp = Path(tempfile.mkdtemp(prefix=cache_lock.temp_prefix(folder.name), suffix=".tmp", dir=root))
    try:
        (convert or convert_with_transformers)(source, tmp)
        manifest = _manifest(tmp, source, sha)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process renamed its conversion into place first: use it if it is whole.
            if not folder.is_dir() or verify_folder(folder, sha) is not None:
                raise
        else:
            verify_folder(folder, sha)  # writes the stat memo of the fresh files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Converted(folder, built=True, seconds=time.perf_counter() - start, rebuilt_because=reason)


def conversion_bytes(gguf_path: Path) -> int | None:
    """The float32 folder's size estimated from the GGUF header: 4 bytes per parameter; None if unreadable.

    (The tokenizer files add a few MB; tied embeddings are stored once, as in the GGUF.)
    """
    import math

    from embfilter_cli.model.gguf_header import UnsupportedGGUF, read_header

    try:
        header = read_header(Path(gguf_path))
    except (OSError, UnsupportedGGUF, ModelNotFoundError):
        return None  # the converter reports an unreadable file in its own words
    return 4 * sum(math.prod(t.shape) for t in header.tensors.values())


def cached_conversion(
    gguf_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    notify: NotifyFn | None = None,
    *,
    any_size: bool = False,
) -> Path | None:
    """`converted_folder(...).folder`, or None: the cache cannot be written (read-only, full, no
    permission), or the conversion would not fit the cache (below).

    The caller then loads the GGUF file itself, as with --no-cache: slower, same vectors. `notify`
    says why.

    Size policy (bench/RESULTS.md, "GGUF conversion: load time vs disk"): converting saves ~97% of
    every later load at any size, but costs ~4 bytes per parameter (3.8x a Q8_0 file, 7x a Q4 one).
    A new folder is built only when it takes at most half the cache's size limit (20 GB by default:
    models up to ~2.5B parameters), so one model never evicts the whole cache; larger GGUFs load
    directly unless the limit is raised. `any_size` (a caller that needs the folder itself, such as
    the sentence-transformers export) converts whatever the size.
    """
    limit = max_size()
    budget = None if any_size or limit is None else limit // 2
    try:
        return converted_folder(gguf_path, cache_dir, notify=notify, budget=budget).folder
    except TooLargeToConvert as exc:
        if notify:
            notify(
                f"Loading {Path(gguf_path).name} from the GGUF file itself, not converting it: its float32 folder would "
                f"take {human_size(exc.estimate)}, over half the cache's {human_size(limit or 0)} limit; set "
                f"EMBFILTER_CACHE_MAX_SIZE to {human_size(2 * exc.estimate)} or more to convert it once for faster loads"
            )
        return None
    except Exception as exc:
        reason = unwritable_reason(exc)
        if reason is None:
            raise
        if notify:
            notify(
                f"Cannot convert {Path(gguf_path).name} into the cache {cache_root(cache_dir)} ({reason}); loading the "
                "GGUF file directly (slower; free space or point EMBFILTER_CACHE or --cache-dir at a writable folder)"
            )
        return None


def _discard(path: Path) -> None:
    """Move a damaged entry out of the way atomically, then delete it."""
    aside = path.with_name(f".{path.name}.damaged-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, aside)
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
    path.with_name(path.name + ".verified.json").unlink(missing_ok=True)


__all__ = [
    "MANIFEST",
    "Converted",
    "TooLargeToConvert",
    "cache_root",
    "cached_conversion",
    "conversion_bytes",
    "conversion_key",
    "convert_with_transformers",
    "converted_folder",
    "file_sha256",
    "gguf_sha256",
    "verify_folder",
]
