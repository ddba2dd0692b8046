"""One mechanism for usage errors: every command reports an impossible combination the same way.

Commands and the core raise `errors.UsageError` (BandError is one); `cli.EmbfilterGroup` maps it
once to exit 2 with the usage line of the command that was running, then `Error: <message>`.
These run without catching exceptions, so an escaped traceback fails them.
"""

import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import BandError, EmbfilterError, UsageError


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        (["fit", "--band", "auto", "--rank", "3"], "embfilter fit [OPTIONS]", "--band auto chooses the band itself"),
        (["apply", "F", "-", "-o", "-", "--json"], "embfilter apply [OPTIONS]", "--json prints a summary on stdout"),
        (["embed", "x.txt", "-o", "-", "--json"], "embfilter embed [OPTIONS]", "--json prints a summary on stdout"),
        (["eval", "--data", "lee", "--filter", "F", "--plot", "p.png"], "embfilter eval [OPTIONS]", "--plot draws"),
        (["export", "F", "--format", "npy", "--opset", "13"], "embfilter export [OPTIONS]", "--opset applies to"),
        (
            ["inspect", "directions", "--band", "0:3", "--kept"],
            "embfilter inspect directions [OPTIONS]",
            "choose one of --band, --removed and --kept",
        ),
        (  # a core BandError inside a nested subcommand names that subcommand, not the group
            ["inspect", "directions", "--band", "5:3"],
            "embfilter inspect directions [OPTIONS]",
            "--band 5:3 is empty",
        ),
    ],
)
def test_usage_errors_exit_2_with_the_running_commands_usage_line(runner, tmp_path, monkeypatch, argv, usage, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, argv, prog_name="embfilter", catch_exceptions=False)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"Usage: {usage}")
    assert lines[-1].startswith(f"Error: {message}")
    assert not list(tmp_path.iterdir())  # nothing written


def test_band_error_is_a_usage_error():
    assert issubclass(BandError, UsageError) and issubclass(UsageError, EmbfilterError)
