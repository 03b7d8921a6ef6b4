"""Coordination between the processes of a run: the primary process, barriers, and one
agreed save-and-stop step after SIGTERM / Ctrl-C.

Every function is a cheap no-op on one process. Example:
    >>> if is_primary():
    ...     write_summary()
    >>> barrier("checkpoint written")
    >>> with preemption_notice() as reached:
    ...     for step in steps:
    ...         train(step)
    ...         if reached(step):
    ...             save(step)
    ...             break
"""

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator


def is_primary() -> bool:
    """True on the process that writes logs, summaries and other single-writer files."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (a no-op on one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _preemption_service_running() -> bool:
    """jax.distributed starts the preemption service when this config flag is on."""
    import jax

    return bool(jax.config.jax_enable_preemption_service)


@contextlib.contextmanager
def preemption_notice() -> Iterator[Callable[[int], bool]]:
    """Yields ``reached(step) -> bool``: True at the step where every process should save
    and stop after a SIGTERM or a Ctrl-C (call it once per step, with the same steps on
    every process).

    Several processes: JAX's preemption service (started by jax.distributed) catches SIGTERM
    on any process and agrees on one step for all; a Ctrl-C (SIGINT) is turned into a
    SIGTERM to this process. One process: a handler sets a flag and the current step is
    the one. A second Ctrl-C raises KeyboardInterrupt at once (nothing saved). Handlers
    are installed from the main thread only; elsewhere nothing is caught.
    """
    import jax

    event = threading.Event()
    service = jax.process_count() > 1 and _preemption_service_running()
    if threading.current_thread() is not threading.main_thread():
        yield _service_reached if service else (lambda step: event.is_set())
        return

    def on_interrupt(signum, frame):
        if event.is_set():  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        event.set()
        logging.getLogger("lf_jax").warning(
            "Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again stops at once)"
        )
        if service:
            os.kill(os.getpid(), signal.SIGTERM)

    previous_int = signal.signal(signal.SIGINT, on_interrupt)
    if service:
        try:
            yield _service_reached
        finally:
            signal.signal(signal.SIGINT, previous_int)
        return
    previous_term = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield lambda step: event.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _service_reached(step: int) -> bool:
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)
