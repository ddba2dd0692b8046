"""What every hostile-input test checks, and tiny hand-built files to break.

`expect_error` asserts the contract of a refused input: the exit status, exactly one `Error:`
line on stderr (usage errors: click's usage block ending in one `Error:` line), no traceback,
no uncaught exception. `Snapshot` records a folder's files (names, bytes, and no `*.tmp`) so a
test can assert that a failed run left nothing behind and changed nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import numpy as np


def expect_error(result, status: int = 1, match: str | None = None) -> str:
    """Assert a clean refusal; returns the `Error:` line."""
    assert result.exit_code == status, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    if status == 2:
        assert lines and lines[-1].startswith("Error:"), result.stderr
        assert sum(line.startswith("Error:") for line in lines) == 1, result.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    if match is not None:
        assert match in lines[-1], lines[-1]
    assert "\x1b" not in result.stderr
    return lines[-1]


class Snapshot:
    """The files under a folder (path -> bytes), to compare before and after a failed run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = self._read()

    def _read(self) -> dict[str, bytes]:
        out = {}
        for p in sorted(self.folder.rglob("*")):
            if p.is_file() or p.is_symlink():
                out[str(p.relative_to(self.folder))] = p.read_bytes() if p.is_file() else b"<link>"
        return out

    def assert_unchanged(self) -> None:
        now = self._read()
        leftovers = [name for name in now if name.endswith(".tmp")]
        assert not leftovers, leftovers
        assert now == self.files, sorted(set(now) ^ set(self.files)) or "contents changed"


def fill_disk(folder: Path) -> None:
    """Write into `folder` until its file system has no free block left."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())


def safetensors_bytes(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    """A safetensors file from an arbitrary (possibly hostile) header object."""
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def head_file(path: Path, rows: int = 40, d: int = 8, seed: int = 0, values: np.ndarray | None = None) -> Path:
    """A single-tensor `lm_head.weight` safetensors checkpoint (float32 unless `values` says otherwise)."""
    w = values if values is not None else np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)
    tag = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16"}[w.dtype]
    header = {"lm_head.weight": {"dtype": tag, "shape": list(w.shape), "data_offsets": [0, w.nbytes]}}
    path.write_bytes(safetensors_bytes(header, np.ascontiguousarray(w).tobytes()))
    return path


def gguf_bytes(
    kvs: list[tuple[str, int, bytes]] | None = None,
    tensors: list[tuple[str, list[int], int, int]] | None = None,
    data: bytes = b"",
    version: int = 3,
    counts: tuple[int, int] | None = None,
    alignment_pad: int = 32,
) -> bytes:
    """A little-endian GGUF file: kvs are (key, value type, packed value); tensors (name, dims fastest
    first, ggml type, offset). `counts` overrides the (tensor, kv) counts written in the header."""
    kvs = kvs or []
    tensors = tensors or []
    n_t, n_kv = counts if counts is not None else (len(tensors), len(kvs))

    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv)
    for key, vtype, value in kvs:
        out += string(key) + struct.pack("<I", vtype) + value
    for name, dims, ggml_type, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % alignment_pad)
    return out + data
