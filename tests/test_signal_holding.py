"""Stop signals held during library start-up and ignored-but-recorded at exit (in-process, real signals).

The end-to-end stops (real `python -m embfilter_cli` processes, every engine) are in
tests/hostile/test_signals.py; the windows fixed here are too narrow to hit reliably from outside
(a SIGTERM 4.8–5.0 s into `apply --engine ray` aborted the process; one during Ray's atexit
`shutdown` printed a traceback and crashed), so the mechanisms are tested directly.
"""

import os
import signal
import time
import types

import pytest

from embfilter_cli import signals
from embfilter_cli.engines.ray_engine import _ray_signal_handlers_off
from embfilter_cli.signals import Terminated, hold_until_exit, install_signal_handlers, stop_signals_held


@pytest.fixture
def our_handlers():
    """Our handlers installed for the test (as `cli.main` does), everything put back after it."""
    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    for s in signals.STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    install_signal_handlers()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    signals._received.clear()


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in the main thread at the next bytecode


def test_a_signal_inside_the_block_is_raised_when_it_ends(our_handlers):
    after_signal = False
    with pytest.raises(Terminated) as stop, stop_signals_held():
        _deliver(signal.SIGTERM)
        after_signal = True  # not interrupted half-way
    assert after_signal and stop.value.status == 143
    assert signal.getsignal(signal.SIGTERM) is signals._raise_terminated  # ours again


def test_handlers_a_library_installs_in_the_block_are_replaced_by_ours(our_handlers):
    with stop_signals_held():
        signal.signal(signal.SIGTERM, lambda *a: None)  # what ray.init does
    assert signal.getsignal(signal.SIGTERM) is signals._raise_terminated
    with pytest.raises(Terminated):
        _deliver(signal.SIGTERM)


def test_after_the_outcome_a_signal_is_recorded_and_a_second_one_would_end_the_process(our_handlers):
    hold_until_exit()
    _deliver(signal.SIGTERM)  # no exception: atexit callbacks run undisturbed
    assert signals._received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ray_start_up_handlers_are_switched_off_for_the_call_and_restored():
    def setter(handler):
        raise AssertionError("Ray's handler must not be installed")

    utils = types.SimpleNamespace(set_sigterm_handler=setter)
    constants = types.SimpleNamespace(RAY_DISABLE_FAILURE_SIGNAL_HANDLER=False)
    ray = types.SimpleNamespace(_private=types.SimpleNamespace(utils=utils, ray_constants=constants))
    with _ray_signal_handlers_off(ray):
        ray._private.utils.set_sigterm_handler(lambda *a: None)  # a no-op now
        assert constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER is True
    assert utils.set_sigterm_handler is setter and constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER is False
    with _ray_signal_handlers_off(types.SimpleNamespace()):  # another Ray layout: nothing to switch off
        pass
