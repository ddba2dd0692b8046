"""Without -q, a refused input is still exactly one `Error:` line when a script reads stderr.

Real processes with real pipes (what a pipeline or a test harness sees), and one run on a
pseudo-terminal to show that a person watching still gets the info lines.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile._util import Snapshot, safetensors_bytes

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBFILTER_DEBUG", None)
    return env


def _corrupt_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    # The header claims 16 bytes; it holds a JSON object that is not a safetensors header.
    (folder / "model.safetensors").write_bytes(safetensors_bytes(None, raw_header=b'{"a":1}' + b" " * 9))
    return folder


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "--model", "{model}", "-o", "{out}/f.safetensors"],
        ["fit", "--model", "{out}/missing", "-o", "{out}/f.safetensors"],
        ["verify", "{junk}"],
        ["export", "{junk}", "--onnx", "-o", "{out}/f.onnx"],
        ["apply", "{junk}", "{junk}", "-o", "{out}/y.npy"],
        ["inspect", "spectrum", "--filter", "{junk}"],
    ],
    ids=["fit-corrupt-model", "fit-missing-model", "verify-junk", "export-junk", "apply-junk", "inspect-junk"],
)
def test_one_error_line_on_a_pipe_without_q(tmp_path, argv):
    model = _corrupt_model(tmp_path / "model")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a filter at all")
    out = tmp_path / "out"
    out.mkdir()
    before = Snapshot(tmp_path)
    args = [a.format(model=model, out=out, junk=junk) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "embfilter_cli", *args], capture_output=True, env=_env(), timeout=300, check=False
    )
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert proc.stdout == b""
    before.assert_unchanged()


def test_a_terminal_still_gets_the_info_lines(tmp_path):
    model = _corrupt_model(tmp_path / "model")
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "embfilter_cli",
                "fit",
                "--model",
                str(model),
                "-o",
                str(tmp_path / "f.safetensors"),
            ],
            stdout=subprocess.PIPE,
            stderr=follower,
            env={**_env(), "COLUMNS": "400"},
            timeout=300,
            check=False,
        )
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the writer side is closed and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert proc.returncode == 1
    assert f"Model: {model}" in text
    assert "Error: " in text
