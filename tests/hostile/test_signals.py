"""Stop signals on every engine: stop, remove partial files, exit 130/143, one line (issue 16, kind 7).

Real `python -m embfilter_cli` processes and real signals (CliRunner runs in-process and cannot be
signalled). A signal is sent once the job has demonstrably started writing: its first hidden
`*.tmp` output exists (polled, bounded). Every wait has a timeout, so a job that ignores the signal
fails the test instead of hanging it.

Also here: `--ray-address` values that are garbage or where nothing listens (a one-line error in
seconds, never a traceback or a minutes-long hang).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
D = 16


def _start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("EMBFILTER_DEBUG", None)
    # A fresh session: SIGINT is not ignored (as it is for `cmd &` in a non-interactive shell).
    return subprocess.Popen(
        [sys.executable, "-m", "embfilter_cli", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_tmp(proc: subprocess.Popen[str], folder: Path, timeout: float) -> bool:
    """Poll until a hidden `*.tmp` file appears under `folder` (the job is writing); False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if folder.exists() and any(p.name.endswith(".tmp") for p in folder.rglob(".*")):
            return True
        time.sleep(0.02)
    return False


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the job did not stop within {timeout} s of the signal")
    return proc.returncode, err


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture
def slow_data(tmp_path, make_filter) -> tuple[Path, Path]:
    """A filter and a folder of 4 Parquet files, each many small row groups, so each output takes a while."""
    filt = make_filter(d=D)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        x = rng.standard_normal((20_000, D)).astype(np.float32)
        table = pa.table(
            {"id": np.arange(len(x)), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)}
        )
        pq.write_table(table, data / f"p{i}.parquet", row_group_size=200)
    assert sum(f.stat().st_size for f in data.iterdir()) < 8 << 20
    return filt, data


def _run_and_signal(args, cwd, out: Path, signum: int, tmp_timeout: float) -> tuple[int, str]:
    proc = _start(args, cwd)
    if not _wait_for_tmp(proc, out, tmp_timeout):
        rc, err = _finish(proc)
        assert rc == 0, err  # ended on its own before it was seen writing: it must at least have succeeded
        pytest.skip("the job ended before it was seen writing; the machine is too fast for this test")
    proc.send_signal(signum)
    return _finish(proc)


def _assert_stopped(rc: int, err: str, signum: int, out: Path, data_before: dict[str, bytes], data: Path) -> None:
    assert rc == 128 + signum, (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["Interrupted; no output file was written."], err
    assert "Traceback" not in err
    time.sleep(0.5)  # anything still running would go on writing now
    assert not _leftovers(out), _leftovers(out)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == data_before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_local_engine_stops_on_a_signal(slow_data, tmp_path, signum):
    filt, data = slow_data
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    out = tmp_path / "out"
    rc, err = _run_and_signal(["apply", str(filt), str(data), "-o", str(out), "-q"], tmp_path, out, signum, 60)
    _assert_stopped(rc, err, signum, out, before, data)


def test_a_signal_whose_exception_a_library_swallows_still_stops_the_job(slow_data, tmp_path):
    """pyarrow imports pandas lazily inside a Cython function that cannot raise: a SIGTERM arriving
    then was swallowed and the job ended with exit 0. Here the signal is sent from inside such a
    swallowing call on the first batch, every time."""
    filt, data = slow_data
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    out = tmp_path / "out.parquet"
    script = (
        "import os, signal, sys\n"
        "import embfilter_cli.vectors.arrow_batches as ab\n"
        "from embfilter_cli.cli import main\n"
        "original = ab.column_vectors\n"
        "def swallowing(*args, **kwargs):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        sum(range(1000))  # the handler runs here; its exception is caught below\n"
        "    except BaseException:\n"
        "        pass\n"
        "    return original(*args, **kwargs)\n"
        "ab.column_vectors = swallowing\n"
        "sys.argv = ['embfilter', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBFILTER_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-c", script, "apply", str(filt), str(data / "p0.parquet"), "-o", str(out), "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == ["Interrupted; no output file was written."], done.stderr
    assert not out.exists() and not _leftovers(tmp_path)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


ray_only = pytest.mark.skipif(
    __import__("importlib").util.find_spec("ray") is None, reason="the ray extra is not installed"
)


@ray_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_ray_engine_stops_on_a_signal(slow_data, tmp_path, signum):
    filt, data = slow_data
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    out = tmp_path / "out"
    args = ["apply", str(filt), str(data), "-o", str(out), "--engine", "ray", "-q"]
    rc, err = _run_and_signal(args, tmp_path, out, signum, 180)
    _assert_stopped(rc, err, signum, out, before, data)


@ray_only
def test_sigterm_while_ray_starts_is_a_clean_stop(slow_data, tmp_path):
    """ray.init installs its own SIGTERM handler (exit 15, no cleanup) before ours is put back."""
    filt, data = slow_data
    out = tmp_path / "out"
    proc = _start(["apply", str(filt), str(data), "-o", str(out), "--engine", "ray", "-q"], tmp_path)
    time.sleep(1.0)  # inside imports or ray.init: either must end the same way
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 143, (rc, err)
    assert err.strip().splitlines() == ["Interrupted; no output file was written."], err
    assert not out.exists() or not any(out.iterdir())


@ray_only
@pytest.mark.parametrize(
    ("address", "status", "words"),
    [
        ("garbage!!", 2, "is not HOST:PORT or `auto`"),
        ("host:notaport", 2, "is not HOST:PORT or `auto`"),
        ("127.0.0.1:9", 1, "cannot reach a Ray cluster at 127.0.0.1:9"),
    ],
)
def test_bad_ray_address_is_one_line_in_seconds(slow_data, tmp_path, address, status, words):
    filt, data = slow_data
    out = tmp_path / "out"
    started = time.monotonic()
    proc = _start(
        ["apply", str(filt), str(data), "-o", str(out), "--engine", "ray", "--ray-address", address], tmp_path
    )
    rc, err = _finish(proc, timeout=60)
    assert time.monotonic() - started < 60
    assert rc == status, (rc, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum(line.startswith("Error:") for line in lines) == 1, err
    assert words in lines[-1], lines[-1]
    if status == 1:
        assert len(lines) == 1, err
    assert not out.exists()
