"""Stop signals as exceptions, and a record of them that third-party code cannot swallow.

The CLI turns SIGINT, SIGTERM and SIGHUP into exceptions (`Terminated`, a KeyboardInterrupt) so
that every `finally` runs: temporary files are removed, one line is printed, the exit status is
128 + signal. Raising from a signal handler is not enough on its own: Python runs the handler at
whatever line the main thread is on, and some of those lines cannot pass an exception on. pyarrow
imports pandas lazily from a Cython function that cannot raise (`to_numpy` on the first batch), so
a SIGTERM arriving during that import was printed as "Exception ignored" and the job finished with
exit 0. So the handler also records the signal, and `raise_if_signalled` raises it again at the
points that must not be passed after a stop was asked for: before an output is published
(`files.atomic_path`), at each batch, and when a command returns.

`stop_signals_held` protects start-up code of libraries: a stop signal during it is recorded and
raised when it ends, and handlers the library installed are replaced by ours again (Ray's
`ray.init` installs its own SIGTERM handler, which exits with status 15 and no cleanup).

Not handled: a signal received while the handlers are not installed (library use, where the
caller owns signal handling), and SIGKILL, which nothing can catch (`--resume` cleans up after it).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

_received: list[int] = []  # signals our handler turned into exceptions, oldest first


class Terminated(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised where the program was so that cleanup (`atomic_path`) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.status = 128 + signum


def _raise_terminated(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """Turn the stop signals into `Terminated` (where nobody else handles them) and forget earlier ones.

    Python's default for SIGTERM/SIGHUP is to die on the spot, skipping every `finally`, which
    leaves the hidden `*.tmp` file of an atomic output behind; SIGINT's default raises a plain
    KeyboardInterrupt that is not recorded. Handlers someone else installed are left alone.
    """
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler, None):
            signal.signal(signum, _raise_terminated)


def raise_if_signalled() -> None:
    """Raise `Terminated` again if a stop signal arrived and the exception it raised was swallowed.

    Cheap (one list check): call it at each batch and before publishing an output.
    """
    if _received:
        raise Terminated(_received[0])


def _record(signum: int, frame: object) -> None:
    _received.append(signum)


def _record_then_default(signum: int, frame: object) -> None:
    _received.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once


def hold_until_exit() -> None:
    """Once the command's outcome is decided: stop signals are recorded, no longer raised.

    What runs after that is the interpreter's exit: libraries' `atexit` callbacks, such as Ray's
    `shutdown`, where a raised `Terminated` was printed as "Exception ignored in atexit callback"
    with a traceback and the process crashed (status −11 or 1) after a job that had finished and
    published its outputs. The exit status stays the command's; a second signal ends the process
    at once, in case a library's clean-up hangs.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is _raise_terminated:
            signal.signal(signum, _record_then_default)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold the stop signals during the block: recorded, then raised once it has ended; handlers restored.

    For library start-up code that must not be interrupted half-way (an exception raised inside
    `ray.init` while its C++ core worker connects left the process to crash at exit with status −11),
    and that replaces the handlers with its own (put back afterwards). Blocking the signals at the
    OS level instead would be inherited by every process the library starts.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved: dict[int, Any] = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in saved.items():
        if handler is _raise_terminated:
            signal.signal(signum, _record)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: installed from C, cannot be restored from Python
                signal.signal(signum, handler)
    raise_if_signalled()
