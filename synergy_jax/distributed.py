"""Multi-process start-up: when and how to call `jax.distributed.initialize()`.

Every process of a multi-host job must call it before touching devices. Sources, first match wins:
1. explicit arguments (the job's `--coordinator_address/--num_processes/--process_id` flags);
2. the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (any launcher);
3. a cluster JAX detects by itself: a Cloud TPU pod slice (`TPU_WORKER_HOSTNAMES` with more than one host),
   SLURM with more than one task, Open MPI with more than one rank -> `initialize()` without arguments.
Otherwise the job is single-process and nothing is initialised. On CPU, cross-process collectives need gloo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, Mapping


def distributed_arguments(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single-process job."""
    env = os.environ if env is None else env
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        return dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(name)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        return dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    multi_host_tpu = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    if multi_host_tpu or slurm or mpi:
        return {}  # JAX's cluster auto-detection fills everything in
    return None


_initialized = False  # whether this process called `initialize` (it is one of several)


def is_one_of_several() -> bool:
    """Whether this process started a multi-process job (`initialize` ran)."""
    return _initialized


def initialize(arguments: dict | None) -> bool:
    """Calls `jax.distributed.initialize(**arguments)` unless None; returns whether it did."""
    if arguments is None:
        return False
    import jax

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)
    global _initialized
    _initialized = True
    return True


def exit_now(code: int, at_once: bool = False) -> None:
    """Ends the process with `code`, at once (no interpreter finalisation) when it is one of several or asked to.

    A normal exit waits at JAX's shutdown barrier for every other process; after a failure those may be waiting in
    a collective for this one, and all of them would then sit out the barrier's 5-minute timeout and abort. Leaving
    without the barrier closes this process's connections: the others' collectives fail within seconds and they
    exit the same way (`cli.run_or_exit`). Output is flushed first; files were closed by the code that wrote them.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if _initialized or at_once:
        os._exit(code)
    sys.exit(code)


def default_log_verbosity() -> None:
    """The jobs' logging defaults: absl at WARNING unless --verbosity was given (Orbax logs every file operation at
    INFO), and no transformers advisory that PyTorch is missing (expected: the jobs use only its tokenizers)."""
    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def is_main_process() -> bool:
    """Process 0 writes logs, summaries and files; the others compute."""
    import jax

    return jax.process_index() == 0


def on_main_process(what: str, work, *args, **kwargs) -> None:
    """`work(*args, **kwargs)` on process 0 only, then every process waits for it: for writes to a shared
    filesystem (data generation, precompute) that concurrent processes would race on. If it fails, every process
    raises (process 0 its own error), instead of the others waiting for it forever."""
    import jax

    error = None
    if is_main_process():
        try:
            work(*args, **kwargs)
        except Exception as caught:  # re-raised below, after the others have heard of it
            error = caught
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = bool(np.any(multihost_utils.process_allgather(np.asarray([error is not None]))))
        if failed and error is None:
            raise ValueError(f"process 0 failed: {what} (its output says why)")
    if error is not None:
        raise error


def log(message: str) -> None:
    """print() on process 0 only."""
    if is_main_process():
        print(message, flush=True)


_interrupted_by_user = False  # a Ctrl-C stopped this job's training loop (its command line then exits 130)
CTRL_C_MESSAGE = b"Ctrl-C: saving after this step, then stopping (press Ctrl-C again to stop at once, unsaved)\n"


def interrupted_by_user() -> bool:
    """Whether a Ctrl-C (on any process) stopped this job's training loop: it saved and stopped like a preempted
    one, and the command line exits 130, as an interrupted command does, instead of 0."""
    return _interrupted_by_user


def forget_interruption() -> None:
    """A new job starts: no Ctrl-C has stopped it (jobs run one after another in a notebook's process)."""
    global _interrupted_by_user
    _interrupted_by_user = False


def ignore_interrupts(*unused: object) -> None:
    """In a worker process (Grain's, precompute's): Ctrl-C at a terminal reaches the whole process group, and the
    parent decides what it means (save and stop), so a worker ignores it instead of dying with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _install(signum: int, handler):
    """`signal.signal`, returning a previous handler that can be put back (None, one set from C, cannot)."""
    previous = signal.signal(signum, handler)
    return signal.SIG_DFL if previous is None else previous


class StopRequest:
    """SIGTERM (preemption) or a first Ctrl-C during the training steps -> save and stop at the next step boundary
    (agreed across processes, where only log boundaries are checked). A second Ctrl-C interrupts at once
    (KeyboardInterrupt, without the save). A process that ignores Ctrl-C (a background job) keeps ignoring it."""

    def __init__(self):
        self.requested = self.interrupted = False
        self._previous = _install(signal.SIGTERM, self._handle)
        self._previous_interrupt = signal.getsignal(signal.SIGINT)
        if self._previous_interrupt is not signal.SIG_IGN:
            self._previous_interrupt = _install(signal.SIGINT, self._handle_interrupt)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def _handle_interrupt(self, signum, frame) -> None:
        self.requested = self.interrupted = True
        signal.signal(signal.SIGINT, self._previous_interrupt)
        os.write(2, CTRL_C_MESSAGE)  # not print(): the handler may run in the middle of a write to sys.stderr

    def agreed(self) -> bool:
        """Whether any process was asked to stop (a collective on multi-process runs: call on every process). A
        Ctrl-C on any process marks the job interrupted on all of them, so all exit 130 together."""
        global _interrupted_by_user
        import jax
        import numpy as np
        from jax.experimental import multihost_utils

        flags = np.asarray([self.requested, self.interrupted])
        if jax.process_count() > 1:
            flags = np.any(multihost_utils.process_allgather(flags), axis=0)
        _interrupted_by_user = _interrupted_by_user or bool(flags[1])
        return bool(flags[0])

    def restore(self) -> None:
        """The previous handlers: from here a Ctrl-C interrupts at once, as outside the loop."""
        signal.signal(signal.SIGTERM, self._previous)
        signal.signal(signal.SIGINT, self._previous_interrupt)


def _send_again_soon(signum: int) -> None:
    """Sends `signum` to this process from another thread 10 ms from now. Sent at once, its handler would run before
    this hook or the finalizer around it returns, and its exception would be swallowed there again."""
    timer = threading.Timer(0.01, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Preempted` in the block (the training loop's StopRequest takes over while it runs), so a job
    stopped while it prepares data exits 0 with a message instead of dying silently with 143. The data a job
    prepares (demo data, precomputed shards) is written under temporary names and renamed when complete, so what was
    finished is kept and a rerun continues from it. A stop that lands where Python cannot propagate an exception (a
    garbage-collection callback such as XLA's, a __del__), SIGTERM's or a Ctrl-C's, is not lost: its exception is
    dropped without the "Exception ignored" traceback and the signal is sent again, so it stops the job at the next
    line of ordinary code; should that fail too, the block raises `Preempted` when it ends."""
    from synergy_jax.errors import Preempted

    requested = []

    def handle(signum, frame) -> None:
        requested.append(signum)
        raise Preempted("stopped by SIGTERM")

    def resend_swallowed_stop(unraisable) -> None:
        ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if isinstance(unraisable.exc_value, Preempted):
            _send_again_soon(signal.SIGTERM)
        elif isinstance(unraisable.exc_value, KeyboardInterrupt) and ctrl_c:
            _send_again_soon(signal.SIGINT)
        else:
            previous_hook(unraisable)

    previous, previous_hook = signal.signal(signal.SIGTERM, handle), sys.unraisablehook
    sys.unraisablehook = resend_swallowed_stop
    try:
        yield
        if requested:
            raise Preempted("stopped by SIGTERM")
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
