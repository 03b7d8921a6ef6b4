"""Counting XLA compilations, to prove a jitted step compiles once.

Example:
    >>> with count_compilations() as counter:
    ...     for _ in range(3):
    ...         step(state, batch)
    >>> counter.count   # 1 on the first use, 0 once warmed up
"""

import contextlib
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_active: list["CompilationCounter"] = []
_registered = False


class CompilationCounter:
    """Number of backend compilations seen while its context was open."""

    def __init__(self) -> None:
        self.count = 0


def _listener(event: str, duration_secs: float, **kwargs) -> None:
    if event == _EVENT:
        with _lock:
            for counter in _active:
                counter.count += 1


@contextlib.contextmanager
def count_compilations():
    """Context manager yielding a CompilationCounter for the enclosed code."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True
        counter = CompilationCounter()
        _active.append(counter)
    try:
        yield counter
    finally:
        with _lock:
            _active.remove(counter)
