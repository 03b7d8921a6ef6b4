"""The device flags of ``lf-jax`` commands and the device set-up they ask for.

``--devices auto|cpu:N|real`` picks real accelerators or simulated CPU devices; the
several-process flags (``--distributed``, ``--coordinator``, ``--num-processes``,
``--process-id``, timeouts) override ``config.distributed``, LF_JAX_* variables and the
scheduler's environment (lf_jax.distributed.multihost.settings_from_env).

Example:
    >>> add_device_arguments(parser)                 # in a command's argument set-up
    >>> setup_devices(args.devices, config, args)   # before any jax device work
"""

import argparse
import importlib.util

from lf_jax.distributed import multihost
from lf_jax.distributed.devices import simulate_cpu_devices
from lf_jax.errors import UserInputError

ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu")


def planned_device_count(args, config) -> int | None:
    """The devices the run will have, when known before they exist: config.devices for
    simulated CPU devices, N x processes for --devices cpu:N; None for real accelerators."""
    choice = getattr(args, "devices", None)
    if choice is None or (
        choice == "auto" and not any(importlib.util.find_spec(n) for n in ACCELERATOR_PLUGINS)
    ):
        return config.get("devices")
    if choice.startswith("cpu:") and choice[4:].isdigit():
        return int(choice[4:]) * distributed_settings(args, config).num_processes
    return None


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --devices and the several-process flags (--distributed, --coordinator, ...)."""
    parser.add_argument(
        "--devices",
        default="auto",
        metavar="auto|cpu:N|real",
        help="auto: real accelerators when a GPU/TPU plugin is installed, else "
        "config.devices simulated CPU devices (split over the processes); "
        "cpu:N simulates N per process; real uses what jax finds (default: auto)",
    )
    group = parser.add_argument_group(
        "several processes (jax.distributed; default: found from LF_JAX_* variables, SLURM, "
        "GKE TPU or JobSet, else one process; see launch/README.md)"
    )
    group.add_argument(
        "--distributed",
        default=None,
        choices=("auto", "off", "jax"),
        help="auto: detect; off: one process; jax: let jax.distributed detect (Cloud TPU VMs)",
    )
    group.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0 (LF_JAX_COORDINATOR_ADDRESS)",
    )
    group.add_argument("--num-processes", type=int, default=None, help="LF_JAX_NUM_PROCESSES")
    group.add_argument("--process-id", type=int, default=None, help="LF_JAX_PROCESS_ID")
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=None,
        metavar="S",
        help="a dead process stops the others after about S s (default 30)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=int,
        default=None,
        metavar="S",
        help="a failed process stops the others after at most S s (default 60)",
    )


def distributed_settings(args, config):
    """Flags > config.distributed (optional section) > LF_JAX_* > scheduler environment."""
    values = dict(config.get("distributed") or {}) if config is not None else {}
    flags = {
        "mode": "distributed",
        "coordinator_address": "coordinator",
        "num_processes": "num_processes",
        "process_id": "process_id",
        "heartbeat_timeout_s": "heartbeat_timeout",
        "shutdown_timeout_s": "shutdown_timeout",
    }
    values.update(
        {
            name: getattr(args, flag)
            for name, flag in flags.items()
            if getattr(args, flag, None) is not None
        }
    )
    return multihost.settings_from_env(**values)


def setup_devices(choice: str, config, args=None) -> None:
    """Simulated CPU devices (per process) and, for several processes, jax.distributed."""
    settings = distributed_settings(args, config)
    count = None  # simulated CPU devices of this process
    if choice.startswith("cpu:"):
        try:
            count = int(choice[4:])
        except ValueError:
            raise UserInputError(
                f"--devices {choice!r}: expected cpu:N with an integer N"
            ) from None
    elif choice not in ("auto", "real"):
        raise UserInputError(f"--devices {choice!r}: expected auto, cpu:N or real")
    elif choice == "auto" and not any(
        importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS
    ):
        total = int(config.get("devices", 1))
        count = multihost.cpu_devices_from_env() or total // settings.num_processes
        if multihost.cpu_devices_from_env() is None and total % settings.num_processes:
            raise UserInputError(
                f"config devices={total} does not split over "
                f"{settings.num_processes} processes; use --devices cpu:N"
            )
    if settings.is_multiprocess:
        multihost.initialize(settings, cpu_devices=count)
    elif count is not None:
        simulate_cpu_devices(count)
