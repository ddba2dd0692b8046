"""The output channels in `embfilter_cli.console`, and that user text (paths) is printed literally.

rich reads `[red]…[/red]`, `[bold]` and `:smile:` in a plain string as markup or emoji; every message
and table cell that can hold a path must come out exactly as given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli import console
from embfilter_cli.cli import app

MARKUP = "[red]x[/red] [bold]b :smile: [batch, 13]"  # markup tags, an emoji code, an ONNX-style shape


@pytest.fixture
def odd_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "[red]x[/red] [bold]b"
    folder.mkdir(parents=True)  # "[/red]" makes it two folders: the path contains the markup either way
    return folder


@pytest.fixture(autouse=True)
def _fresh_console_state():
    """Each test starts from the defaults (quiet and verbose off) and leaves them so."""
    console.set_quiet(False)
    console.set_verbose(False)
    yield
    console.set_quiet(False)
    console.set_verbose(False)


def test_info_warn_and_text_are_literal(capsys):
    console.set_verbose(True)
    console.info(f"Writing {MARKUP}")
    console.warn(f"odd {MARKUP}")
    console.out_text(f"data {MARKUP}")
    out, err = capsys.readouterr()
    assert err == f"Writing {MARKUP}\nWarning: odd {MARKUP}\n"
    assert out == f"data {MARKUP}\n"


def test_quiet_hides_info_not_warnings(capsys):
    console.set_quiet(True)
    try:
        console.info("hidden")
        console.warn("shown")
    finally:
        console.set_quiet(False)
    assert capsys.readouterr().err == "Warning: shown\n"


def test_info_shows_only_to_a_terminal_or_with_verbose(capsys, monkeypatch):
    console.info("to a pipe")  # pytest's stderr is not a terminal
    console.notice("building the cache")
    console.warn("always")
    assert capsys.readouterr().err == "building the cache\nWarning: always\n"
    console.set_verbose(True)
    console.info("asked for")
    assert capsys.readouterr().err == "asked for\n"
    console.set_verbose(False)
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: True)
    console.info("a person is watching")
    assert capsys.readouterr().err == "a person is watching\n"
    console.set_quiet(True)  # -q beats both the terminal and -v
    console.set_verbose(True)
    console.info("hidden")
    console.notice("hidden too")
    assert capsys.readouterr().err == ""


def test_table_cells_and_title_are_literal_and_styles_apply(capsys):
    table = console.DataTable([console.Column("name"), console.Column("n", justify="right")], title=MARKUP)
    table.add_row(MARKUP, console.styled("[b]7", "green"))
    console.print_table(table)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == MARKUP
    assert f"│ {MARKUP} │ [b]7 │" in out
    kv = console.key_value_table()
    kv.add_row("saved", MARKUP)
    console.print_table(kv)
    assert capsys.readouterr().out == f"saved  {MARKUP}\n"
    # our own styling still reaches a terminal
    rich_table = table.to_rich()
    cell = rich_table.columns[1]._cells[0]
    assert str(cell.style) == "green" and cell.plain == "[b]7"


def test_emit_json_uses_the_one_fallback(capsys):
    console.emit_json({"x": np.float32(1.5), "v": np.arange(2), "p": Path("a/[b]")})
    assert json.loads(capsys.readouterr().out) == {"x": 1.5, "v": [0, 1], "p": "a/[b]"}


def test_progress_yields_none_when_not_interactive():
    with console.progress_bar("Working", 10) as report:
        assert report is None  # pytest's stderr is not a terminal


# --------------------------------------------------------------------------- through the CLI


def test_fit_prints_an_odd_model_path_literally(runner, tiny_llama, odd_dir, monkeypatch):
    monkeypatch.setattr(console.out_console, "_width", 500)  # an 80-column table would shorten long paths with …
    model = odd_dir / "llama"
    shutil.copytree(tiny_llama, model)
    out = odd_dir / "[bold]f.safetensors"
    result = runner.invoke(app, ["-v", "fit", "--model", str(model), "--rank", "2", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert f"Model: {model}" in result.stderr  # info line
    rows = [line.rstrip().split(None, 1) for line in result.stdout.splitlines()]
    table = {key: value for key, value in rows if key in ("model", "saved")}
    assert table == {"model": str(model), "saved": str(out)}  # table cells
    again = runner.invoke(app, ["-v", "fit", "--model", str(model), "--rank", "2", "-o", str(out)])
    assert again.exit_code == 1
    assert again.stderr.startswith(f"Error: {out} already exists")  # error line


def test_export_prints_an_odd_path_literally(runner, make_filter, odd_dir):
    filt = make_filter()
    target = odd_dir / "P.npy"
    result = runner.invoke(app, ["-v", "export", str(filt), "--format", "npy", "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    assert f"Wrote {target} (npy," in result.stderr  # info line
    again = runner.invoke(app, ["-v", "export", str(filt), "--format", "npy", "-o", str(target)])
    assert again.exit_code == 1 and str(target) in again.stderr and again.stderr.startswith("Error: ")


def test_apply_prints_an_odd_path_literally(runner, make_filter, odd_dir):
    filt = make_filter()
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    x[1, 3] = np.nan
    np.save(odd_dir / "x.npy", x)
    out = odd_dir / "[bold]y.npy"
    args = ["apply", str(filt), str(odd_dir / "x.npy"), "-o", str(out)]
    result = runner.invoke(app, ["-v", *args, "--allow-nonfinite"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == "Warning: 1 input vectors held NaN/Inf; their results are NaN/Inf"
    assert result.stderr.splitlines()[1].endswith(f"→ {out}")  # info line
    np.save(odd_dir / "x.npy", x[:, :8])
    bad = runner.invoke(app, ["-v", *args, "--force"])
    assert bad.exit_code == 1
    assert bad.stderr.startswith(f"Error: {odd_dir / 'x.npy'} holds 8-dimensional vectors")  # error line


def test_inspect_warning_prints_an_odd_model_path_literally(runner, tiny_llama, odd_dir):
    model = odd_dir / "llama"
    shutil.copytree(tiny_llama, model)
    for tok in model.glob("tokenizer*"):
        tok.unlink()
    result = runner.invoke(app, ["inspect", "directions", "--model", str(model), "--band", "0:2", "--top", "2"])
    assert result.exit_code == 0, result.stderr
    assert f"Warning: no tokenizer files found for {model}" in result.stderr
