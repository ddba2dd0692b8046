"""Outputs under pressure: signals, concurrent writers, full disks, read-only folders, closed stdout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import OutputExistsError
from embfilter_cli.files import atomic_path
from tests.hostile._util import Snapshot, expect_error, fill_disk, head_file

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBFILTER_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "embfilter_cli", *args],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
    )


def _wait_for(pattern: str, folder: Path, timeout: float = 60) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob(pattern))
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} appeared in {folder}")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_during_apply_removes_the_temp_file(art, tmp_path, signum, status):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.npy").write_bytes(b"untouched")
    before = Snapshot(out_dir)
    proc = _cli("apply", "-q", str(art), "-", "--format", "jsonl", "--batch-size", "1", "-o", str(out_dir / "v.npy"))
    assert proc.stdin is not None
    proc.stdin.write((json.dumps({"embedding": [0.5] * 16}) + "\n").encode())
    proc.stdin.flush()
    _wait_for(".v.npy.*.tmp", out_dir)  # the run is inside atomic_path, stdin still open
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == status, err
    lines = err.decode().strip().splitlines()
    assert lines == ["Interrupted; no output file was written."], err
    before.assert_unchanged()


def test_two_concurrent_writers_exactly_one_wins(tmp_path):
    out = tmp_path / "f.bin"
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def writer(tag: str) -> None:
        try:
            with atomic_path(out) as tmp:
                tmp.write_bytes(tag.encode() * 1000)
                barrier.wait(timeout=10)  # both have passed the early "exists?" check
        except OutputExistsError:
            outcomes.append("refused")
        else:
            outcomes.append(tag)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "refused"]
    assert len(winners) == 1 and outcomes.count("refused") == 1, outcomes
    assert out.read_bytes() == winners[0].encode() * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_force_still_replaces(tmp_path):
    out = tmp_path / "f.bin"
    out.write_bytes(b"old")
    with atomic_path(out, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"


def test_failed_write_removes_the_folders_it_created(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a" / "b" / "f.bin") as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- full and read-only disks


def _big_model(tmp_path: Path) -> Path:
    return head_file(tmp_path / "m.safetensors", rows=64, d=96)  # a 96×96 float32 projection: 36 KB


def _writing_commands(tmp_path: Path, art: Path, folder: Path) -> dict[str, list[str]]:
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((600, 16), dtype=np.float32))
    return {
        "fit": [
            "fit",
            "-q",
            "-m",
            str(_big_model(tmp_path)),
            "--rank",
            "1",
            "--no-reduce",
            "-o",
            f"{folder}/f.safetensors",
        ],
        "apply": ["apply", "-q", str(art), str(vectors), "-o", f"{folder}/v.npy"],
        "export-npy": ["export", "-q", str(art), "--format", "npy", "-o", f"{folder}/p.npy"],
        "export-safetensors": ["export", "-q", str(art), "--format", "safetensors", "-o", f"{folder}/p.safetensors"],
    }


@pytest.mark.parametrize("command", ["fit", "apply", "export-npy", "export-safetensors"])
def test_full_disk_is_one_line(runner, art, tmp_path, full_dir, command):
    fill_disk(full_dir)
    before = Snapshot(full_dir)
    args = _writing_commands(tmp_path, art, full_dir)[command]
    line = expect_error(runner.invoke(app, args))
    out = args[args.index("-o") + 1]
    assert f"could not write {out}: the disk is full" in line and "free space or choose another" in line, line
    assert ".tmp" not in line, line  # the user's path, never the hidden temporary file's
    before.assert_unchanged()


@pytest.mark.parametrize("command", ["fit", "apply", "export-npy", "export-safetensors"])
def test_read_only_folder_is_one_line_before_any_work(runner, art, tmp_path, ro_dir, command):
    before = Snapshot(ro_dir)
    args = _writing_commands(tmp_path, art, ro_dir)[command]
    expect_error(runner.invoke(app, args), match="not writable")
    before.assert_unchanged()


# --------------------------------------------------------------------------- stdout


def test_stdout_to_dev_full_is_one_line(art, tmp_path):
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((2000, 16), dtype=np.float32))
    with open("/dev/full", "wb") as full:
        proc = _cli("apply", "-q", str(art), str(vectors), "--to", "jsonl", stdout=full)
        _, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error:"), err


def test_stdout_closed_is_one_line(art, tmp_path):
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((2000, 16), dtype=np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "embfilter_cli", "apply", "-q", str(art), str(vectors), "--to", "jsonl"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        pass_fds=(),
        preexec_fn=lambda: os.close(1),
        timeout=120,
    )
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error:"), done.stderr


def test_broken_pipe_is_one_line(art, tmp_path):
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((20000, 16), dtype=np.float32))
    proc = _cli("apply", "-q", str(art), str(vectors), "--to", "jsonl")
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error:"), err


def test_invalid_utf8_on_stdin_to_embed_fails_before_loading_a_model(tmp_path):
    proc = _cli("embed", "-q", "--model", str(tmp_path / "no-such-model"), "-", "-o", "-")
    _, err = proc.communicate(b"fine\n\xff\xfe broken\n", timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "stdin line 2 is not valid UTF-8" in lines[0]


def test_eval_data_that_is_a_directory(runner, tmp_path):
    (tmp_path / "d").mkdir()
    before = Snapshot(tmp_path)
    expect_error(runner.invoke(app, ["eval", "-q", "--data", str(tmp_path / "d")]), match="directory")
    before.assert_unchanged()


def test_an_unwrapped_full_disk_names_the_file_not_stdout(runner, art, tmp_path, monkeypatch):
    """A writer the core forgot to wrap still gives one line, naming its file rather than stdout."""
    import errno

    from embfilter_cli.export import formats

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "P.npy"))

    monkeypatch.setattr(formats, "export_npy", full)
    line = expect_error(runner.invoke(app, ["export", str(art), "--format", "npy", "-o", str(tmp_path / "P.npy")]))
    assert "standard output" not in line and str(tmp_path / "P.npy") in line and "free space" in line
