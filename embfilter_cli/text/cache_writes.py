"""A cache whose writes may fail: a read-only or full cache folder costs speed, never the run.

`BestEffortCache` is `text.cache.Cache` with every store wrapped: the first store that cannot be
written (read-only folder, full disk, quota) is reported once through `warn`, and the run goes on
without storing anything more. Reading the cache is unchanged, so a read-only shared cache still
gives its hits.

Not handled: a cache that cannot be read (that is a miss, as in `Cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from embfilter_cli.files import OutputWriteError, unwritable_reason
from embfilter_cli.text.cache import Cache


class BestEffortCache(Cache):
    """A `Cache` that warns once and stops storing when its folder cannot be written."""

    def __init__(
        self, root: Path | None = None, enabled: bool = True, warn: Callable[[str], None] | None = None
    ) -> None:
        if warn is None:
            super().__init__(root, enabled)
        else:
            super().__init__(root, enabled, warn=warn)
        self.write_failed = False

    def _store(self, save: Callable[..., None], *args: Any) -> None:
        if self.write_failed:
            return
        try:
            save(*args)
        except (OSError, OutputWriteError) as exc:
            reason = unwritable_reason(exc)
            if reason is None:  # not a write failure (a bug, or an input error): not ours to hide
                raise
            self._failed(reason)

    def _failed(self, reason: str) -> None:
        self.write_failed = True
        self.warn(
            f"the cache {self.root} cannot be written ({reason}); going on without storing results there "
            "(free space, or pass --cache-dir DIR or --no-cache)"
        )

    def save_embeddings(self, key: str, array: Any) -> None:
        """`Cache.save_embeddings`, or nothing once the cache has failed to write."""
        self._store(super().save_embeddings, key, array)

    def save_spectrum(self, key: str, spectrum: Any, head: dict[str, Any]) -> None:
        """`Cache.save_spectrum`, or nothing once the cache has failed to write."""
        self._store(super().save_spectrum, key, spectrum, head)

    def save_json(self, kind: str, key: str, value: dict[str, Any]) -> None:
        """`Cache.save_json`, or nothing once the cache has failed to write."""
        self._store(super().save_json, kind, key, value)
