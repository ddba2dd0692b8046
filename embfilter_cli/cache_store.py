"""What the embfilter cache holds, and how it is bounded: listing, pruning and the size limit.

The cache (`$EMBFILTER_CACHE`, default `~/.cache/embfilter`) holds one folder per kind of entry;
`KINDS` is the registry the listing walks, so a new kind is one line here:

    gguf/<key>/                  GGUF model converted to a Hugging Face folder (model/gguf_convert.py)
    embeddings/<key>.safetensors raw embeddings of an eval data set (text/cache.py)
    spectra/<key>.safetensors    a W_U's exact spectrum (text/cache.py)
    heads/<key>.json             a W_U's facts (text/cache.py)
    self-texts/<key>.json        texts a model sampled itself (text/self_samples.py)

An entry's source (the model or file it came from) is read from its own sidecar or header; its
last use from the marker `cache_lock.mark_used` touches on every hit. Which entries go first, for
`cache prune --max-size` and for the limit enforced after each new entry: conversions made by another
transformers version than the installed one (they can never be hit again), then the least recently
used. An entry another process holds (`cache_lock`) is never removed, nor the one just built.

The limit: `$EMBFILTER_CACHE_MAX_SIZE` (e.g. `20GB`, `500MiB`, `0` for no limit), default
`DEFAULT_MAX_SIZE` = 20 GB: room for the built-in model's conversion (0.54 GB) and every eval
entry many times over, and for a ~2B-parameter model's float32 conversion; see README "Cache".

Not handled: files under the cache root that no kind claims (left alone, not counted).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embfilter_cli import cache_lock
from embfilter_cli.errors import CacheError

MAX_SIZE_ENV = "EMBFILTER_CACHE_MAX_SIZE"
DEFAULT_MAX_SIZE = 20 * 10**9


@dataclass(frozen=True)
class Kind:
    """One kind of cache entry: where its entries live and how to read what each one came from."""

    name: str  # the folder under the cache root
    label: str  # what `embfilter cache` calls it
    folders: bool = False  # entries are folders (else files ending in `suffix`)
    suffix: str = ""
    sidecars: tuple[str, ...] = ()  # siblings `<entry name><sidecar>` that belong to the entry
    skip: tuple[str, ...] = ()  # non-hidden children that are not entries (memo folders)


@dataclass
class Entry:
    """One cached entry, as `embfilter cache` lists it."""

    kind: Kind
    path: Path
    bytes: int
    created: float
    last_used: float | None
    source: str = ""
    detail: str = ""
    outdated: bool = False  # made by another transformers version: never hit again
    in_use: bool = False

    @property
    def used(self) -> float:
        """Last use, or creation when no use was recorded."""
        return self.last_used if self.last_used is not None else self.created

    def as_dict(self) -> dict[str, Any]:
        """The entry for `embfilter cache --json`."""
        return {
            "kind": self.kind.name,
            "path": str(self.path),
            "source": self.source,
            "bytes": self.bytes,
            "created": _iso(self.created),
            "last_used": _iso(self.last_used) if self.last_used is not None else None,
            "detail": self.detail,
            "outdated": self.outdated,
            "in_use": self.in_use,
        }


KINDS: tuple[Kind, ...] = (
    Kind("gguf", "GGUF conversion", folders=True, sidecars=(".verified.json",), skip=("sources",)),
    Kind("embeddings", "eval embeddings", suffix=".safetensors"),
    Kind("spectra", "eval spectrum", suffix=".safetensors"),
    Kind("heads", "head facts", suffix=".json"),
    Kind("self-texts", "self-generated texts", suffix=".json"),
)
GGUF_MANIFEST = "embfilter-conversion.json"  # model/gguf_convert.py writes it (model sits above this layer)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# --------------------------------------------------------------------------- sizes and ages

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_AGE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw])\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str, what: str = "--max-size") -> int:
    """Bytes in `20GB`, `500MB`, `1.5G`, `512MiB`, `0` (K/M/G/T are powers of 1000; KiB… of 1024)."""
    match = _SIZE.match(text)
    if match is None or (match.group(3) and not match.group(2)):
        raise CacheError(f"{what} {text!r} is not a size; write it like 20GB, 500MB or 512MiB (0: no limit)")
    number, unit, binary = float(match.group(1)), match.group(2).lower(), bool(match.group(3))
    scale = 1024 ** "kmgt".index(unit) * 1024 if binary else _UNITS[unit]
    return int(number * scale)


def parse_age(text: str) -> float:
    """Seconds in `30d`, `12h`, `45m`, `90s`, `2w`."""
    match = _AGE.match(text)
    if match is None:
        raise CacheError(f"--older-than {text!r} is not an age; write it like 30d, 12h, 45m or 2w")
    return float(match.group(1)) * _AGE_UNITS[match.group(2).lower()]


def human_size(n: float) -> str:
    """`1.23 GB`-style size (powers of 1000, as `parse_size` reads them back)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def max_size() -> int | None:
    """The enforced limit in bytes (`$EMBFILTER_CACHE_MAX_SIZE`, default 20 GB); None: no limit (`0`)."""
    text = os.environ.get(MAX_SIZE_ENV)
    limit = DEFAULT_MAX_SIZE if text is None or not text.strip() else parse_size(text, MAX_SIZE_ENV)
    return limit or None


# --------------------------------------------------------------------------- listing


def check_root(root: Path) -> Path:
    """`root` if it is a folder or does not exist yet; a file there is a CacheError."""
    if root.exists() and not root.is_dir():
        raise CacheError(f"the cache path {root} is not a folder; remove it or set EMBFILTER_CACHE to a folder")
    return root


def installed_transformers() -> str | None:
    """The installed transformers version, read from its metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def _json_head(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError, RecursionError):
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    return {}


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file's header (at most 1 MiB read), or {}."""
    with contextlib.suppress(OSError, ValueError, RecursionError, struct.error), open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length <= 1 << 20:
            meta = json.loads(handle.read(length)).get("__metadata__")
            return meta if isinstance(meta, dict) else {}
    return {}


def _describe(kind: Kind, path: Path, transformers: str | None) -> tuple[str, str, bool, float | None]:
    """(source, detail, outdated, created-or-None) of one entry, from what it holds."""
    if kind.name == "gguf":
        manifest = _json_head(path / GGUF_MANIFEST)
        if not manifest:
            return "", "incomplete (no manifest)", False, None
        made_by = str(manifest.get("transformers", ""))
        outdated = transformers is not None and made_by != transformers
        return str(manifest.get("gguf_name", "")), f"transformers {made_by}", outdated, None
    head = _safetensors_metadata(path) if kind.suffix == ".safetensors" else _json_head(path)
    created = None
    if isinstance(head.get("created"), str):
        with contextlib.suppress(ValueError):
            from datetime import datetime

            created = datetime.fromisoformat(head["created"].replace("Z", "+00:00")).timestamp()
    return str(head.get("source", "")), "", False, created


def _entry_paths(root: Path, kind: Kind) -> list[Path]:
    folder = root / kind.name
    try:
        children = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CacheError(
            f"cannot read the cache folder {folder} ({exc.strerror or exc}); check its permissions"
        ) from exc
    found = []
    for child in children:
        if child.name.startswith(".") or child.name in kind.skip or child.is_symlink():
            continue
        if (kind.folders and child.is_dir()) or (
            not kind.folders and child.is_file() and child.name.endswith(kind.suffix)
        ):
            found.append(child)
    return found


def list_entries(root: Path, kinds: Iterable[Kind] = KINDS) -> list[Entry]:
    """Every entry under `root`, kind by kind (in `KINDS` order), each kind by name."""
    check_root(root)
    transformers = installed_transformers()
    entries = []
    for kind in kinds:
        for path in _entry_paths(root, kind):
            try:
                created = path.stat().st_mtime
            except OSError:
                continue  # removed while we looked
            size = cache_lock.tree_bytes(path) + sum(
                cache_lock.tree_bytes(path.with_name(path.name + s)) for s in kind.sidecars
            )
            source, detail, outdated, stated = _describe(kind, path, transformers)
            entries.append(
                Entry(
                    kind=kind,
                    path=path,
                    bytes=size,
                    created=stated if stated is not None else created,
                    last_used=cache_lock.last_used(root, path),
                    source=source,
                    detail=detail,
                    outdated=outdated,
                    in_use=cache_lock.in_use(root, path),
                )
            )
    return entries


# --------------------------------------------------------------------------- pruning


@dataclass
class Pruned:
    """What a prune removed (or would remove, for a dry run) and what it had to leave."""

    removed: list[Entry] = field(default_factory=list)
    busy: list[Entry] = field(default_factory=list)  # chosen, but in use by another process
    temporaries: list[Path] = field(default_factory=list)  # leftovers of killed builders
    remaining: int = 0  # bytes left in the cache's entries

    @property
    def freed(self) -> int:
        """Bytes of the removed entries."""
        return sum(e.bytes for e in self.removed)


def eviction_order(entries: Iterable[Entry]) -> list[Entry]:
    """Which entries go first: outdated conversions, then least recently used (oldest first)."""
    return sorted(entries, key=lambda e: (not e.outdated, e.used, str(e.path)))


def _remove(root: Path, entry: Entry) -> None:
    """Delete an entry (held exclusively by the caller) and everything that belongs to it."""
    # Renamed aside first, so a reader never sees a half-deleted folder; a prune killed during the
    # delete leaves a pid-named temporary that the next run sweeps.
    aside = entry.path.with_name(f".{entry.path.name}.{os.getpid()}.prune{time.monotonic_ns() % 10**8}.tmp")
    os.rename(entry.path, aside)
    cache_lock.remove_path(aside)
    for sidecar in entry.kind.sidecars:
        cache_lock.remove_path(entry.path.with_name(entry.path.name + sidecar))
    cache_lock.forget(root, entry.path)


def prune(
    root: Path,
    *,
    older_than: float | None = None,
    max_bytes: int | None = None,
    everything: bool = False,
    dry_run: bool = False,
    keep: Iterable[Path] = (),
    now: float | None = None,
) -> Pruned:
    """Remove entries: all of them, those unused for `older_than` seconds, then the first in
    `eviction_order` until the rest fits in `max_bytes`. Entries in use by another process and
    those in `keep` stay. Stale temporaries of killed builders go too.

    With `dry_run` nothing is deleted; the result says what would be.
    """
    now = time.time() if now is None else now
    entries = list_entries(root)
    kept = {Path(p) for p in keep}
    result = Pruned()
    total = sum(e.bytes for e in entries)
    for kind in KINDS:
        result.temporaries += cache_lock.stale_temporaries(root, kind.name)
    for entry in eviction_order(entries):
        wanted = (
            everything
            or (older_than is not None and now - entry.used > older_than)
            or (max_bytes is not None and total > max_bytes)
        )
        if not wanted or entry.path in kept:
            continue
        if dry_run:  # nothing is taken or created, not even a lock file
            if cache_lock.in_use(root, entry.path):
                result.busy.append(entry)
                continue
        else:
            try:
                with cache_lock.locked(root, entry.path, wait=False) as free:
                    if not free:
                        result.busy.append(entry)
                        continue
                    _remove(root, entry)
            except FileNotFoundError:
                continue  # another prune removed it first
            except OSError as exc:
                raise CacheError(
                    f"could not remove {entry.path} from the cache ({exc.strerror or exc}); check its permissions"
                ) from exc
        result.removed.append(entry)
        total -= entry.bytes
    if not dry_run:
        for path in result.temporaries:
            cache_lock.remove_path(path)
    result.remaining = total
    return result


def enforce_limit(root: Path, new_entry: Path, notify: Callable[[str], None] | None = None) -> Pruned | None:
    """After `new_entry` was added: remove least recently used entries until the cache fits its limit.

    The new entry is never removed, nor one in use. `notify` gets one line when something was.
    Returns what was removed, or None when the cache is within its limit (or has none).
    """
    limit = max_size()
    if limit is None:
        return None
    total = sum(e.bytes for e in list_entries(root))
    if total <= limit:
        return None
    try:
        done = prune(root, max_bytes=limit, keep=[new_entry])
    except CacheError as exc:  # the new entry is in place: a failed clean-up must not fail the run
        if notify is not None:
            notify(f"The cache {root} passed its {human_size(limit)} limit but could not be pruned: {exc}")
        return None
    if done.removed and notify is not None:
        over = (
            f" (still {human_size(done.remaining)}: the rest is in use or just built)" if done.remaining > limit else ""
        )
        notify(
            f"The cache {root} passed its {human_size(limit)} limit; removed {len(done.removed)} least recently used "
            f"entr{'y' if len(done.removed) == 1 else 'ies'} ({human_size(done.freed)}){over}. "
            f"`embfilter cache` lists it; {MAX_SIZE_ENV} sets the limit"
        )
    return done


def used(root: Path, entry: Path) -> None:
    """Record a cache hit on `entry` (see `cache_lock.mark_used`)."""
    cache_lock.mark_used(root, entry)


__all__ = [
    "DEFAULT_MAX_SIZE",
    "KINDS",
    "MAX_SIZE_ENV",
    "Entry",
    "Kind",
    "Pruned",
    "enforce_limit",
    "eviction_order",
    "human_size",
    "list_entries",
    "max_size",
    "parse_age",
    "parse_size",
    "prune",
    "used",
]
