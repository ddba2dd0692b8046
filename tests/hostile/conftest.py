"""Disks that refuse writes, shared by the hostile output tests.

`full_dir` is a 16 KiB tmpfs with a `keep.txt`; `_util.fill_disk` then leaves it with no free block.
`ro_dir` is a read-only tmpfs (as root, where chmod would not stop a write), or a 0555 folder when
not root; `ro_dir_with` mounts a tmpfs, lets a test put files in it, then remounts it read-only.
"""

from __future__ import annotations

import gc
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _umount(folder: Path) -> None:
    # A failed writer's file object can sit in a reference cycle with the traceback (pyarrow's
    # ParquetWriter): collect it so its descriptor closes and the mount is not busy.
    gc.collect()
    subprocess.run(["umount", str(folder)], check=False)


def _mount(folder: Path, options: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def full_dir(tmp_path) -> Iterator[Path]:
    folder = tmp_path / "full"
    if not _mount(folder, "size=16k"):
        pytest.skip("needs root and tmpfs to simulate a full disk")
    (folder / "keep.txt").write_text("x")
    yield folder
    _umount(folder)


@pytest.fixture
def ro_dir(tmp_path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not _mount(folder, "ro,size=16k"):
        pytest.skip("cannot mount a read-only tmpfs")
    yield folder
    _umount(folder)


@pytest.fixture
def ro_dir_with(tmp_path) -> Iterator[Callable[[Callable[[Path], None]], Path]]:
    """`ro_dir_with(fill)`: a tmpfs that `fill(folder)` writes into, then remounted read-only."""
    mounted: list[Path] = []

    def make(fill: Callable[[Path], None]) -> Path:
        folder = tmp_path / f"ro{len(mounted)}"
        if not _mount(folder, "size=4m"):
            pytest.skip("needs root and tmpfs to make a read-only folder with files in it")
        mounted.append(folder)
        fill(folder)
        done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot remount a tmpfs read-only")
        return folder

    yield make
    for folder in mounted:
        _umount(folder)
