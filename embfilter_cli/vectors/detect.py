"""Which vector format an input is: from its file name, else from its first bytes (pipes included)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any

from embfilter_cli.vectors.registry import EXTENSIONS, REGISTRY

# Binary formats first: their magic bytes are specific, while a text format's `{` could also begin
# a binary header (a safetensors header length of 123 starts with the byte `{`).
_SNIFF_ORDER = sorted(REGISTRY.values(), key=lambda f: f.text)


def format_from_path(path: str | os.PathLike[str]) -> str | None:
    """The vector format a file name implies (`.npy`, `.jsonl`/`.ndjson`, `.safetensors`), else None."""
    return EXTENSIONS.get(Path(path).suffix.lower())


def sniff_format(head: bytes) -> str | None:
    """Guess the format from the first bytes of a stream (at least 9 for safetensors), else None.

    `.npy` starts with its magic string; safetensors with an 8-byte little-endian header length
    followed by `{`; JSONL with `{` (after optional whitespace).
    """
    return next((f.name for f in _SNIFF_ORDER if f.sniff(head)), None)


class _PrefixedRaw(io.RawIOBase):
    """A raw stream that first returns `head` (bytes already read for sniffing), then the rest of `fp`."""

    def __init__(self, head: bytes, fp: IO[bytes]) -> None:
        super().__init__()
        self._head, self._fp = head, fp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._fp.readinto(buffer)  # type: ignore[attr-defined]


def peek_head(fp: IO[bytes], n: int = 16) -> tuple[IO[bytes], bytes]:
    """Read a stream's first `n` bytes for sniffing; returns (a stream that still starts with them, head).

    Works on pipes, where neither seeking back nor `peek` (which may return fewer bytes) is reliable.
    """
    head = fp.read(n)
    return io.BufferedReader(_PrefixedRaw(head, fp), buffer_size=1 << 20), head
