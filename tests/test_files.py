"""`files`: atomic outputs (publish on success, leave nothing on failure, never clobber without force)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from embfilter_cli.errors import OutputExistsError
from embfilter_cli.files import atomic_path, check_writable, default_cache_dir


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_success_publishes_the_file_and_no_temporary(tmp_path):
    out = tmp_path / "sub" / "out.bin"  # the parent folder is created
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp != out and not out.exists()
        tmp.write_bytes(b"payload")
    assert out.read_bytes() == b"payload"
    assert _leftovers(out.parent) == ["out.bin"]


def test_an_exception_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []


def test_writer_that_deletes_the_temporary_is_fine_on_failure(tmp_path):
    with pytest.raises(ValueError), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.unlink()
        raise ValueError("writer removed its file first")
    assert _leftovers(tmp_path) == []


def test_an_existing_file_is_untouched_without_force(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=r"out\.bin already exists; pass --force"), atomic_path(out):
        pytest.fail("the body must not run")
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == ["out.bin"]


def test_a_failure_with_force_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(out, force=True) as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == ["out.bin"]


def test_force_replaces_an_existing_file(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with atomic_path(out, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and _leftovers(tmp_path) == ["out.bin"]


def test_a_directory_is_never_an_output(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        check_writable(tmp_path / "d", force=False)
    with pytest.raises(OutputExistsError, match="is a directory; give a file path with -o"):
        check_writable(tmp_path / "d", force=True)
    assert check_writable(tmp_path / "new.bin", force=False) == tmp_path / "new.bin"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_published_file_has_open_permissions_minus_umask(tmp_path, umask):
    """mkstemp makes 0600 files; the output gets 0666 & ~umask like a plain open() would."""
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"x")
        with open(tmp_path / "plain.bin", "wb") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out.bin").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EMBFILTER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "embfilter"


# --------------------------------------------------------------------------- folder outputs, messages


def test_temp_dir_beside_removes_itself_and_the_folders_it_made_on_any_failure(tmp_path):
    from embfilter_cli.files import temp_dir_beside

    (tmp_path / "kept").mkdir()
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), temp_dir_beside(tmp_path / "kept" / "a" / "b" / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            raise exc
        assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_temp_dir_beside_is_gone_after_success_whether_renamed_or_not(tmp_path):
    from embfilter_cli.files import temp_dir_beside

    with temp_dir_beside(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
        os.rename(tmp, tmp_path / "out")
    with temp_dir_beside(tmp_path / "other") as tmp:  # a writer that moved only the files out
        (tmp / "g").write_text("y")
        os.replace(tmp / "g", tmp_path / "out" / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f", "g"]


def test_an_error_that_names_the_temporary_file_names_the_output(tmp_path):
    from embfilter_cli.errors import ExportError

    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as caught, atomic_path(out) as tmp:
        raise ExportError(f"cannot load {tmp.name}: bad bytes in {tmp}; nothing was written")
    assert str(caught.value) == f"cannot load model.onnx: bad bytes in {out}; nothing was written"
    # a temporary name the writer did not make itself (a side file's) is cleaned up by its shape
    with pytest.raises(ExportError) as caught, atomic_path(out):
        raise ExportError(f"see {tmp_path}/.weights.data.ab12_xyz.tmp and .x.onnx.q1w2e3r4.tmp")
    assert str(caught.value) == f"see {tmp_path}/weights.data and x.onnx"
    assert list(tmp_path.iterdir()) == []


def test_unwritable_reason_tells_write_failures_from_others(tmp_path):
    import errno

    from embfilter_cli.files import OutputWriteError, unwritable_reason, write_error

    assert unwritable_reason(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert unwritable_reason(write_error(tmp_path / "f", OSError(errno.EROFS, "x"))) == "the file system is read-only"
    assert unwritable_reason(OutputWriteError("could not write f: /x is not writable", "/x is not writable")) == (
        "/x is not writable"
    )
    assert unwritable_reason(RuntimeError("I/O error: No space left on device (os error 28)")) == "the disk is full"
    assert unwritable_reason(OSError(errno.ENOENT, "No such file")) is None
    assert unwritable_reason(ValueError("bad")) is None
