"""Text read from files is shown with control characters escaped: no terminal escapes get through."""

from __future__ import annotations

import json

from embfilter_cli.cli import app
from embfilter_cli.errors import printable
from tests.hostile._util import expect_error, head_file

ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"


def test_printable_escapes_controls_and_bidi_but_keeps_text():
    assert printable("a\x1b[31mb\u202ec\rd\x00é✓") == "a\\x1b[31mb\\u202ec\\x0dd\\x00é✓"
    assert printable("tab\tand\nnewline") == "tab\tand\nnewline"


def test_model_path_with_escapes_is_printed_escaped(runner, tmp_path):
    folder = tmp_path / f"m{ESC}"
    folder.mkdir()
    head_file(folder / "model.safetensors")
    out = tmp_path / "f.safetensors"
    result = runner.invoke(app, ["-v", "fit", "-m", str(folder), "--rank", "1", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x1b" not in result.stderr and "\x07" not in result.stdout
    assert "\\x1b" in result.stdout + result.stderr  # shown, visibly
    # --json keeps the exact name (JSON escapes it itself)
    again = runner.invoke(app, ["-v", "fit", "-q", "-m", str(folder), "--rank", "1", "-o", str(out), "-f", "--json"])
    assert json.loads(again.stdout)["model_source"].endswith(f"m{ESC}")


def test_error_line_quoting_a_file_name_with_escapes(runner, tmp_path):
    bad = tmp_path / f"x{ESC}.safetensors"
    bad.write_bytes(b"\xff" * 40)
    line = expect_error(runner.invoke(app, ["fit", "-q", "-m", str(bad), "-o", str(tmp_path / "f.safetensors")]))
    assert "\\x1b" in line and "\x07" not in line


def test_dangling_link_in_artifacts_is_skipped(runner, art, tmp_path, monkeypatch):
    import os
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts").mkdir()
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "artifacts" / "z-dangling.safetensors")
    result = runner.invoke(app, ["verify", "-q"])
    expect_error(result, match="none found")
    shutil.copy(art, tmp_path / "artifacts" / "a.safetensors")
    assert runner.invoke(app, ["verify", "-q"]).exit_code == 0
