"""The CLI's shell: --help/--version stay light, completions don't drift, errors are one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embfilter_cli import __version__
from embfilter_cli.cli import COMMANDS, app
from embfilter_cli.completion import SHELLS, completion_source

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "numpy", "safetensors", "gguf")


def _modules_after(argv: list[str], env: dict[str, str] | None = None) -> set[str]:
    code = (
        "import sys\n"
        "from embfilter_cli.cli import app\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    app.main(prog_name='embfilter')\nexcept SystemExit:\n    pass\n"
        "print('\\nMODULES', ' '.join(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    run_env = dict(os.environ, **(env or {}))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=run_env, cwd=ROOT, check=True
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MODULES")][-1]
    return set(line.split()[1:])


@pytest.mark.parametrize(
    "argv",
    [["embfilter", "--help"], ["embfilter", "--version"]]
    + [["embfilter", name, "--help"] for name in sorted(COMMANDS)],
)
def test_help_and_version_do_not_import_heavy_libraries(argv):
    loaded = _modules_after(argv)
    assert not loaded & set(HEAVY), f"{argv} imported {sorted(loaded & set(HEAVY))}"


def test_shell_completion_does_not_import_heavy_libraries():
    env = {"_EMBFILTER_COMPLETE": "bash_complete", "COMP_WORDS": "embfilter fi", "COMP_CWORD": "1"}
    loaded = _modules_after(["embfilter"], env)
    assert not loaded & set(HEAVY)


def test_completion_lists_commands_and_options():
    env = dict(os.environ, _EMBFILTER_COMPLETE="bash_complete", COMP_WORDS="embfilter fit --ra", COMP_CWORD="2")
    out = subprocess.run([sys.executable, "-m", "embfilter_cli"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert "--rank" in out.stdout and "--ratio" in out.stdout


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_checked_in_completions_match_the_app(shell):
    checked_in = (ROOT / "completions" / SHELLS[shell]).read_text()
    assert checked_in == completion_source(shell), (
        f"completions/{SHELLS[shell]} drifted; run `python -m embfilter_cli.completion completions`"
    )


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_unknown_command_is_a_usage_error(runner):
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.stderr


def test_debug_variable_shows_tracebacks(tmp_path):
    args = [sys.executable, "-m", "embfilter_cli", "fit", "-m", str(tmp_path / "missing-dir/x.gguf"), "--rank", "1"]
    plain = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, EMBFILTER_DEBUG=""))
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("Error: --model ")
    debug = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, EMBFILTER_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ModelNotFoundError" in debug.stderr


def test_quiet_does_not_leak_into_the_next_invocation(runner):
    from embfilter_cli.console import is_quiet

    assert runner.invoke(app, ["-q", "models"]).exit_code == 0
    assert is_quiet()
    assert runner.invoke(app, ["models"]).exit_code == 0
    assert not is_quiet()
