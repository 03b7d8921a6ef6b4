"""The environment of a process a test starts: the test run's settings without its device count.

The suite runs on 8 simulated CPU devices (tests/conftest.py) and with XLA settings of its
own; a child process (the CLI, a notebook kernel, a multi-process worker) chooses its own
device count, so only the device-count flag is removed and every other XLA flag carries over.

Example:
    >>> env = child_env(CI="true")
    >>> "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")
    False
"""

import os
from collections.abc import Mapping

from lf_jax.distributed.devices import without_device_count_flag


def child_env(
    base: Mapping[str, str] | None = None, drop: tuple[str, ...] = (), **settings: str
) -> dict[str, str]:
    """``base`` (default ``os.environ``) minus the simulated device count and the ``drop``
    variables, plus ``settings``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in drop}
    flags = without_device_count_flag(env.get("XLA_FLAGS", ""))
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update(settings)
    return env
