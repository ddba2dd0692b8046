"""Run `apply` and `embed` on Ray Data: one task per output file, on a pool of actors.

Ray Data schedules the work units (`vectors.shards.WorkUnit`, one per output file) over an actor
pool (`map_batches` with a callable class and `concurrency`); each actor builds its `FilterBatch` or
`EmbedBatch` once (the filter or the encoder is loaded once per actor, one GPU each with
`num_gpus=1`) and streams its files with the same code as the local engine (`vectors.tables`),
so values, row order and file names are identical to a local run, every output is written
atomically, and `--shard`/`--resume` mean the same. Ray's own `write_parquet` is not used for the
CLI because it names files itself and writes them non-atomically; for pipelines of your own, the
callable classes plug straight into `ray.data.read_parquet(...).map_batches(FilterBatch, ...)`
(see the README).

Without an address a local Ray is started with the machine's CPUs (or `num_cpus`); `address="auto"`
joins a running cluster (`ray start --head` on the head node). A failing actor fails the job: the
first error is re-raised with its own message, and only the outputs finished before it exist.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from embfilter_cli.errors import EmbfilterError, EngineError, MissingDependencyError, UsageError
from embfilter_cli.signals import Terminated, stop_signals_held
from embfilter_cli.vectors.shards import WorkUnit, check_outputs, remove_stale_temporaries
from embfilter_cli.vectors.tables import TableStats, plan_states, run_unit, split_work

RAY_PIP = "pip install 'embfilter[ray]'"
RAY_CONNECT_TIMEOUT_S = 10.0  # a cluster's head answers a TCP connection at once; a wrong address never does


def require_ray() -> Any:
    """The `ray` module, or a MissingDependencyError naming the pip command."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingDependencyError(
            f"--engine ray needs Ray Data ({exc.name} is not installed); run: {RAY_PIP}"
        ) from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Start (or join) Ray once per process; quiet, no dashboard, and the caller's signal handlers kept.

    Raises:
        UsageError: `address` is neither `auto` nor HOST:PORT (optionally `ray://HOST:PORT`).
        EngineError: nothing answers at `address` within `RAY_CONNECT_TIMEOUT_S`, or Ray refused to start or join.
    """
    ray = require_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if address is None:
            kwargs["num_cpus"] = num_cpus
        else:
            check_ray_address(address)
        where = f" at {address}" if address else ""
        # A stop signal during ray.init is held until it returns (raised half-way, it left the
        # process to crash at exit), and the SIGTERM handlers Ray installs while it starts are
        # kept off (`_ray_signal_handlers_off`); ours are put back after it in case one got through.
        # Joining, the driver's C++ client writes each retry ("Failed to get cluster ID from GCS
        # server", once a second for ~20 s) straight to descriptor 2; a failure is told by the
        # exception below, so those lines are dropped while it connects.
        quiet = _descriptor_2_silenced() if address is not None else contextlib.nullcontext()
        with stop_signals_held(), _ray_signal_handlers_off(ray), quiet:
            try:
                ray.init(address=address, **kwargs)
            except SystemExit as exc:
                # Should a Ray version install its sys.exit(15) handler another way: stop like any
                # other SIGTERM (status 143, one line).
                if exc.code != signal.SIGTERM:
                    raise
                raise Terminated(signal.SIGTERM) from None
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise EngineError(
                    f"could not start or join Ray{where}: {reason[:300]}; check --ray-address "
                    "(`ray start --head` prints it) or leave it out to start a local Ray"
                ) from None
        with warnings.catch_warnings():
            # Ray's own DataContext() sets its deprecated fields (use_polars, use_push_based_shuffle,
            # use_arrow_tensor_v2) and warns about them: Ray's business, nothing our user can act on.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
            context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        _quiet_ray_data_console()
    return ray


@contextlib.contextmanager
def _ray_signal_handlers_off(ray: Any) -> Iterator[None]:
    """Keep `ray.init`'s own SIGTERM handlers from being installed during the call.

    While it starts, Ray sets (1) Python handlers through `ray._private.utils.set_sigterm_handler`:
    `sys.exit(15)`, then, once it starts a local node, one that drains the node for up to
    `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S` (30 s) and exits 1; and (2) in the driver's C++ core
    worker, absl's failure-signal handler, which prints a C++ stack and aborts (status −6), unless
    `ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER` is set. A SIGTERM in those windows ended the
    job with status 1, −6 or a 30 s+ wait instead of our clean stop (measured: a signal 4.8–5.0 s
    after start aborted). Both are switched off for the call and restored after, so our handler
    (`signals.install_signal_handlers`) stays in charge and the stop is the same as anywhere else.
    Blocking the signals instead would be inherited by the processes Ray starts (their SIGTERM
    blocked: `ray.shutdown` then waits for its kill timeout, 5.3 s instead of 1.1 s).
    """
    private = getattr(ray, "_private", None)
    utils, constants = getattr(private, "utils", None), getattr(private, "ray_constants", None)
    setter = getattr(utils, "set_sigterm_handler", None)
    flag = getattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", None)
    if setter is not None:
        utils.set_sigterm_handler = lambda handler: None  # type: ignore[union-attr]
    if flag is not None:
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # type: ignore[union-attr]
    try:
        yield
    finally:
        if setter is not None:
            utils.set_sigterm_handler = setter  # type: ignore[union-attr]
        if flag is not None:
            constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = flag  # type: ignore[union-attr]


@contextlib.contextmanager
def _descriptor_2_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (C++ libraries write there, not to sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a closed stderr): nothing to silence
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_ray_address(address: str) -> None:
    """Refuse a malformed `address`, and one where nothing listens, before `ray.init` sees it.

    `ray.init` answers a malformed address with a traceback and an unreachable one after minutes of
    retries (ignoring SIGTERM meanwhile); a TCP connection with a timeout answers both in seconds.
    `auto` (the cluster this machine joined) is left to Ray.
    """
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise UsageError(
            f"--ray-address {address!r} is not HOST:PORT or `auto`; pass the address `ray start --head` printed"
        )
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        raise EngineError(
            f"cannot reach a Ray cluster at {address} ({reason} within {RAY_CONNECT_TIMEOUT_S:.0f} s); "
            "start it with `ray start --head` there, or fix --ray-address"
        ) from None


def _quiet_ray_data_console() -> None:
    """Keep Ray Data's INFO/WARNING/ERROR lines off our stderr; its session log file keeps them.

    Ray Data logs every dataset's start, plan and finish (and, on a failure, its own abbreviated
    stack trace) to the console. Our stderr carries our own lines only: a failing actor's error is
    re-raised and printed as one `Error:` line (`_unwrap`), and `ray-data.log` under the Ray
    session folder still has the full record for debugging.
    """
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        # By class name: the file handler's class is private to Ray Data (ray.data._internal.logging).
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.CRITICAL + 1)


class _UnitWorker:
    """A Ray actor: builds the batch function once, then runs whole work units (files) with it."""

    def __init__(self, fn: Any, units: Sequence[WorkUnit], batch_rows: int, resume: bool) -> None:
        self.fn, self.units, self.batch_rows, self.resume = fn, list(units), batch_rows, resume

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = []
        for index in batch["index"].tolist():
            rows.append(run_unit(self.units[index], self.fn, self.batch_rows, self.resume))
        return {"index": batch["index"], "rows": np.asarray(rows, dtype=np.int64)}


def run_units_ray(
    units: Sequence[WorkUnit],
    fn: Any,
    *,
    batch_rows: int,
    force: bool = False,
    resume: bool = False,
    address: str | None = None,
    concurrency: int | None = None,
    num_gpus: float = 0,
    num_cpus: int | None = None,
) -> TableStats:
    """Like `vectors.tables.apply_tables`, with the units spread over Ray actors.

    Raises:
        MissingDependencyError: Ray Data is not installed.
        OutputExistsError / InputDataError: as the local engine (re-raised from the actor that failed).
    """
    started = time.perf_counter()
    states = plan_states(units, fn, batch_rows)
    check_outputs(states, units, force, resume)
    stats = TableStats()
    todo = split_work(units, states, stats, force, resume)
    if todo:
        ray = init_ray(address, num_cpus)
        pool = concurrency or max(1, min(len(todo), int(ray.available_resources().get("CPU", 1))))
        pool = min(pool, len(todo))
        ds = ray.data.from_items([{"index": i} for i in range(len(todo))], override_num_blocks=len(todo))
        with warnings.catch_warnings():
            # `max_restarts` is the way Ray Data's own actor pool code documents to turn restarts off;
            # Ray 2.60 marks every extra remote argument deprecated (removal planned for 2.64) without a
            # named replacement for this one, so that warning (and only it) is silenced here.
            warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                _UnitWorker,
                fn_constructor_kwargs={"fn": fn, "units": todo, "batch_rows": batch_rows, "resume": resume},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool),
                num_gpus=num_gpus or None,
                # No restarts: a failed unit fails the job (module docstring). With restarts on, Ray's
                # core worker prints an error line for every actor whose constructor arguments live in
                # the object store, as ours do.
                max_restarts=0,
            )
        try:
            done = ds.take_all()
        except BaseException as exc:  # an actor failed (Ray wraps its exception), or SIGINT/SIGTERM
            if not isinstance(exc, Exception):
                # Stopped: end the job's actors now (disconnecting ends them), or they would go on
                # writing, and be killed mid-write, after the sweep below.
                ray.shutdown()
            _remove_partial_outputs(todo)
            if not isinstance(exc, Exception):
                raise
            raise _unwrap(exc) from None
        stats.rows = int(sum(int(r["rows"]) for r in done))
        stats.files = len(done)
        stats.outputs = [str(todo[int(r["index"])].output) for r in sorted(done, key=lambda r: int(r["index"]))]
    stats.seconds = time.perf_counter() - started
    return stats


def _remove_partial_outputs(units: Sequence[WorkUnit]) -> None:
    """Delete the temporary files of units that other actors were still writing when one failed.

    Ray stops the remaining actors when the job fails, killing them mid-write without running their
    cleanup, and it does so asynchronously: sweep once now and once after a short grace period so a
    file an actor created just before it was killed is caught as well.
    """
    for attempt in range(2):
        if attempt:
            time.sleep(1.0)
        for unit in units:
            remove_stale_temporaries(unit.output)


def _unwrap(exc: BaseException) -> EmbfilterError:
    """The EmbfilterError an actor raised, found in Ray's wrapping; else a one-line summary."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EmbfilterError):
            return type(current)(str(current))
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    text = " ".join(str(exc).split())
    for line in str(exc).splitlines():  # RayTaskError text ends with "ErrorType: message" of the actor
        if "embfilter_cli.errors." in line:
            return EmbfilterError(line.split(": ", 1)[-1].strip())
    return EmbfilterError(f"a Ray worker failed ({type(exc).__name__}: {text[:300]}); no further outputs were written")
