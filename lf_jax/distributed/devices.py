"""Simulated CPU devices for notebooks, scripts and tests.

JAX fixes its CPU device count when the backend starts, so the count must be set
before the first computation (importing jax is fine, using it is not).

Example:
    >>> import lf_jax
    >>> lf_jax.simulate_cpu_devices(8)
    >>> import jax; len(jax.devices())
    8
"""

import ctypes
import os
import platform
import re
import sys

from lf_jax.checks import check_int
from lf_jax.errors import LfJaxError, UserInputError

_FLAG = "--xla_force_host_platform_device_count"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc malloc.h
# a thread arena's heap size (HEAP_MAX_SIZE on 64-bit): heap_trim unmaps a wholly free
# heap unless the arena's top pad could not fit in the heap before it
_THREAD_HEAP_BYTES = 64 << 20
# 2 GiB - 1, the largest int: -1 (SIZE_MAX) overflows glibc's heap_trim sum and lets
# thread arenas unmap whole freed heaps again
_NEVER_TRIM_BELOW = 2**31 - 1


class DeviceSetupError(UserInputError):
    """The requested simulated device count cannot be applied in this process."""


def without_device_count_flag(xla_flags: str) -> str:
    """``xla_flags`` without its simulated CPU device count (every other flag kept).

    Example:
        >>> without_device_count_flag("--xla_force_host_platform_device_count=8 --a=1")
        '--a=1'
    """
    return re.sub(rf"{_FLAG}=\S+", "", xla_flags).strip()


def backends_started() -> bool:
    """Whether a JAX backend is already up, through the public config API: jax refuses to
    change ``jax_num_cpu_devices`` once it is (the probe puts the value back)."""
    import jax

    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", current + 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def simulate_cpu_devices(count: int) -> int:
    """Makes the CPU backend expose ``count`` devices; returns the device count.

    Idempotent when the backend already runs with ``count`` CPU devices. Raises
    DeviceSetupError when jax already started with another count (restart the kernel
    or process), and ValueError for a count below 1.
    """
    check_int("simulate_cpu_devices: count", count, ValueError)
    import jax

    if backends_started():
        have = jax.device_count()
        platform = jax.default_backend()
        if platform == "cpu" and have == count:
            return have
        raise DeviceSetupError(
            f"simulate_cpu_devices({count}): jax already started with {have} {platform} "
            f"device(s). Call simulate_cpu_devices before any jax computation "
            f"(restart the notebook kernel or process)."
        )
    os.environ["XLA_FLAGS"] = (
        f"{without_device_count_flag(os.environ.get('XLA_FLAGS', ''))} {_FLAG}={count}".strip()
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    jax.config.update("jax_num_cpu_devices", count)
    have = jax.device_count()
    if have != count:
        raise DeviceSetupError(f"simulate_cpu_devices({count}): backend reports {have} devices")
    return have


def keep_freed_memory() -> bool:
    """Makes glibc malloc keep freed memory for reuse; True when applied.

    glibc serves large blocks (XLA's temp buffers) with fresh mmaps and unmaps them on
    free, so every step page-faults its temporaries in again. ``mallopt(M_MMAP_MAX, 0)``
    and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` (what ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=...`` do from the environment) keep them in the heap: peak RSS
    then stays at the high-water mark instead of dropping between steps.
    ``mallopt(M_TOP_PAD, 64 MiB)`` (``MALLOC_TOP_PAD_``) does the same for the threads'
    own arenas (XLA's device threads): glibc unmaps a wholly freed 64 MiB thread heap
    unless the top pad is at least that size, which measured ~27 MB of page faults and
    20 ms of system CPU per 8-device step (bench/BENCHMARKS.md, "Thread arenas' heaps
    kept"); the cost is that memory a thread freed stays with its arena (``lf-jax
    demo``'s peak RSS +0.5 GB, the 8-device step's unchanged). ``import lf_jax`` calls this on
    Linux glibc; ``LF_JAX_MALLOC=default`` in the environment, or a ``MALLOC_MMAP_MAX_``
    / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` of your own, leaves malloc alone.
    Returns False (nothing changed) on other platforms and C libraries.

    Example:
        >>> keep_freed_memory()  # Linux glibc, no opt-out set
        True
    """
    choice = os.environ.get("LF_JAX_MALLOC", "keep")
    if choice not in ("keep", "default"):
        raise UserInputError(f"LF_JAX_MALLOC={choice!r}: expected 'keep' or 'default'")
    if choice == "default" or "MALLOC_MMAP_MAX_" in os.environ:
        return False
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_TOP_PAD_" in os.environ:
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {"M_MMAP_MAX": (_M_MMAP_MAX, 0), "M_TOP_PAD": (_M_TOP_PAD, _THREAD_HEAP_BYTES)}
    settings["M_TRIM_THRESHOLD"] = (_M_TRIM_THRESHOLD, _NEVER_TRIM_BELOW)
    refused = [name for name, (param, value) in settings.items() if mallopt(param, value) != 1]
    if refused:
        raise LfJaxError(f"glibc mallopt refused {', '.join(refused)} (LF_JAX_MALLOC=default)")
    return True
