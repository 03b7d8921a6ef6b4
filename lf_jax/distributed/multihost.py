"""Multi-process start-up: jax.distributed from the environment, bounded failure detection.

``initialize()`` finds the process group from, in order: explicit arguments, the
``LF_JAX_*`` environment variables, SLURM (``srun``), GKE TPU slices (TPU_WORKER_HOSTNAMES /
TPU_WORKER_ID, multislice MEGASCALE_*), a GKE JobSet of GPU pods (JOBSET_NAME,
REPLICATED_JOB_NAME, JOB_COMPLETION_INDEX + LF_JAX_NUM_PROCESSES). One process is a no-op.
With mode "jax" the detection is left to ``jax.distributed.initialize()`` (Cloud TPU VMs).

Failure detection is bounded: a process that dies stops every other process after
``heartbeat_timeout_s`` (JAX's coordination service aborts them with "The following tasks
are unhealthy (stopped sending heartbeats): <process ids>"); a process that exits with an
error stops the others after at most ``shutdown_timeout_s``. JAX's defaults are 100 s and
300 s; lf_jax uses 30 s and 60 s, tests a few seconds.

Environment (all optional):
  LF_JAX_DISTRIBUTED        auto (default) | off | jax
  LF_JAX_COORDINATOR_ADDRESS host:port of process 0
  LF_JAX_COORDINATOR_PORT   port for auto-detected clusters (default 8476)
  LF_JAX_NUM_PROCESSES, LF_JAX_PROCESS_ID, LF_JAX_LOCAL_DEVICE_IDS (e.g. "0,1"; default
                            under SLURM / a JobSet: all of the node's visible GPUs, see
                            lf_jax/distributed/node_devices.py)
  LF_JAX_INIT_TIMEOUT, LF_JAX_HEARTBEAT_TIMEOUT, LF_JAX_SHUTDOWN_TIMEOUT   seconds

Example:
    >>> settings = initialize()            # before any jax computation
    >>> settings.num_processes, settings.source
    (2, 'env')
"""

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

from lf_jax.checks import check_int
from lf_jax.distributed.node_devices import node_local_device_ids
from lf_jax.errors import UserInputError

ENV_PREFIX = "LF_JAX_"
DEFAULT_PORT = 8476
MODES = ("auto", "off", "jax")
_TIMEOUTS = {
    "initialization_timeout_s": ("INIT_TIMEOUT", 300),
    "heartbeat_timeout_s": ("HEARTBEAT_TIMEOUT", 30),
    "shutdown_timeout_s": ("SHUTDOWN_TIMEOUT", 60),
}


class DistributedConfigError(UserInputError):
    """A process-group setting (flag, config or environment variable) that cannot be used."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedSettings:
    """Where this process sits in the job and how failures are bounded."""

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 30
    shutdown_timeout_s: int = 60
    source: str = "single"  # args | env | slurm | gke-tpu | gke-jobset | jax | single

    @property
    def is_multiprocess(self) -> bool:
        return self.mode == "jax" or self.num_processes > 1

    def describe(self) -> str:
        if not self.is_multiprocess:
            return "single process (jax.distributed not started)"
        return (
            f"process {self.process_id} of {self.num_processes} via {self.source}, coordinator "
            f"{self.coordinator_address or '(jax auto-detect)'}, local devices "
            f"{list(self.local_device_ids) if self.local_device_ids else 'jax default'}; "
            f"a dead process stops the others "
            f"within ~{self.heartbeat_timeout_s} s (heartbeat), a failing one within "
            f"{self.shutdown_timeout_s} s (shutdown)"
        )


def _int(field: str, raw, minimum: int) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = None
    if value is None or value < minimum or isinstance(raw, bool):
        raise DistributedConfigError(f"{field}={raw!r} must be an integer >= {minimum}")
    return value


def _address(field: str, raw: str) -> str:
    host, _, port = str(raw).strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(f"{field}={raw!r} must be host:port with a port in 1-65535")
    return f"{host}:{port}"


def _first_slurm_host(nodelist: str) -> str:
    """'node[003-005,009],gpu1' -> 'node003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not match:
        raise DistributedConfigError(f"SLURM_STEP_NODELIST={nodelist!r} names no host")
    return match.group(1) + (match.group(2) or "")


def detect_cluster(env: Mapping[str, str], port: int = DEFAULT_PORT) -> dict | None:
    """Process-group fields found in a scheduler's environment, or None.

    Returns {"source", "coordinator_address", "num_processes", "process_id"} (some may be
    None when the scheduler does not provide them, e.g. a JobSet's process count).
    """
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise DistributedConfigError(
                "SLURM_PROCID is set but SLURM_STEP_NODELIST/SLURM_JOB_NODELIST "
                "is not: run the job with srun"
            )
        return {
            "source": "slurm",
            "coordinator_address": f"{_first_slurm_host(nodes)}:{port}",
            "num_processes": _int("SLURM_NTASKS", env["SLURM_NTASKS"], 1),
            "process_id": _int("SLURM_PROCID", env["SLURM_PROCID"], 0),
        }
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts and "TPU_WORKER_ID" in env:
        workers = [
            host.strip().rsplit(":", 1)[0] if "TPU_PROCESS_ADDRESSES" in env else host.strip()
            for host in hosts.split(",")
            if host.strip()
        ]
        slices = _int("MEGASCALE_NUM_SLICES", env.get("MEGASCALE_NUM_SLICES", "1"), 1)
        slice_id = _int("MEGASCALE_SLICE_ID", env.get("MEGASCALE_SLICE_ID", "0"), 0)
        coordinator = (
            env.get("MEGASCALE_COORDINATOR_ADDRESS", workers[0]).rsplit(":", 1)[0]
            if slices > 1
            else workers[0]
        )
        return {
            "source": "gke-tpu",
            "coordinator_address": f"{coordinator}:{port}",
            "num_processes": len(workers) * slices,
            "process_id": slice_id * len(workers) + _int("TPU_WORKER_ID", env["TPU_WORKER_ID"], 0),
        }
    if "JOBSET_NAME" in env and "JOB_COMPLETION_INDEX" in env:
        jobset, job = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME", "workers")
        return {
            "source": "gke-jobset",
            # JobSet pod host names: <jobset>-<replicated job>-<job index>-<pod index>.<jobset>
            "coordinator_address": f"{jobset}-{job}-0-0.{jobset}:{port}",
            "num_processes": None,
            "process_id": _int("JOB_COMPLETION_INDEX", env["JOB_COMPLETION_INDEX"], 0),
        }
    return None


def settings_from_env(env: Mapping[str, str] | None = None, **overrides) -> DistributedSettings:
    """DistributedSettings from ``overrides`` (flags/config; None = unset) > LF_JAX_* > scheduler.

    Raises DistributedConfigError naming the field for a bad or missing value.
    """
    env = dict(os.environ if env is None else env)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(DistributedSettings)})
    if unknown:
        raise DistributedConfigError(f"unknown distributed setting(s) {unknown}")

    def pick(name: str, env_name: str):
        if name in given:
            return given[name], name
        if ENV_PREFIX + env_name in env:
            return env[ENV_PREFIX + env_name], ENV_PREFIX + env_name
        return None, name

    mode, field = pick("mode", "DISTRIBUTED")
    mode = str(mode or "auto").strip().lower()
    if mode not in MODES:
        raise DistributedConfigError(f"{field}={mode!r} must be one of {list(MODES)}")
    values = {"mode": mode}
    for name, (env_name, default) in _TIMEOUTS.items():
        raw, field = pick(name, env_name)
        values[name] = default if raw is None else _int(field, raw, 1)
    raw_ids, field = pick("local_device_ids", "LOCAL_DEVICE_IDS")
    if raw_ids is not None:
        items = raw_ids.split(",") if isinstance(raw_ids, str) else list(raw_ids)
        values["local_device_ids"] = tuple(_int(field, item, 0) for item in items)
    if mode == "off":
        return DistributedSettings(**values, source="single")
    field = ENV_PREFIX + "COORDINATOR_PORT"
    port = DEFAULT_PORT if field not in env else _int(field, env[field], 1)
    if port > 65535:
        raise DistributedConfigError(f"{field}={env[field]!r} must be a port in 1-65535")
    detected = detect_cluster(env, port) or {}
    fields, origins = {}, set()
    for name, env_name in (
        ("coordinator_address", "COORDINATOR_ADDRESS"),
        ("num_processes", "NUM_PROCESSES"),
        ("process_id", "PROCESS_ID"),
    ):
        raw, field = pick(name, env_name)
        if raw is None and detected.get(name) is not None:
            raw, field = detected[name], f"{detected['source']} {name}"
        elif raw is not None:
            origins.add("args" if name in given else "env")
        fields[name] = (raw, field)
    source = detected.get("source") or ("args" if "args" in origins else "env")
    if mode == "jax":
        return DistributedSettings(**values, source="jax")
    set_fields = [name for name, (raw, _) in fields.items() if raw is not None]
    if not set_fields:
        return DistributedSettings(**values, source="single")
    num = (
        _int(fields["num_processes"][1], fields["num_processes"][0], 1)
        if fields["num_processes"][0] is not None
        else None
    )
    if num is None:
        raise DistributedConfigError(
            f"the process count is not set ({source}): give --num-processes or "
            f"{ENV_PREFIX}NUM_PROCESSES"
        )
    if num == 1:
        return DistributedSettings(**values, source=source)
    missing = [name for name, (raw, _) in fields.items() if raw is None]
    if missing:
        env_names = {"coordinator_address": "COORDINATOR_ADDRESS", "process_id": "PROCESS_ID"}
        raise DistributedConfigError(
            f"{num} processes need {' and '.join(missing)} as well (set "
            f"{' and '.join(ENV_PREFIX + env_names[name] for name in missing)})"
        )
    pid_raw, pid_field = fields["process_id"]
    pid = _int(pid_field, pid_raw, 0)
    if pid >= num:
        raise DistributedConfigError(
            f"{pid_field}={pid_raw!r} must be below the process count {num}"
        )
    address = _address(fields["coordinator_address"][1], fields["coordinator_address"][0])
    if "local_device_ids" not in values and source in ("slurm", "gke-jobset"):
        values["local_device_ids"] = node_local_device_ids(env)  # all of the node's GPUs
    return DistributedSettings(
        **values, coordinator_address=address, num_processes=num, process_id=pid, source=source
    )


def cpu_devices_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """LF_JAX_CPU_DEVICES (simulated CPU devices of this process, set by the local launcher)."""
    env = os.environ if env is None else env
    name = ENV_PREFIX + "CPU_DEVICES"
    return _int(name, env[name], 1) if env.get(name) else None


_INITIALIZED: list[DistributedSettings] = []


def initialize(
    settings: DistributedSettings | None = None, *, cpu_devices: int | None = None
) -> DistributedSettings:
    """Starts jax.distributed for ``settings`` (default: settings_from_env()); returns them.

    A no-op apart from ``cpu_devices`` for a single process. ``cpu_devices`` simulates that
    many CPU devices in this process (tests, the local launcher). Must run before any jax
    computation; calling it again with the same settings is a no-op.
    """
    import jax

    from lf_jax.console import get_logger
    from lf_jax.distributed.devices import backends_started, simulate_cpu_devices

    settings = settings_from_env() if settings is None else settings
    if _INITIALIZED:
        if _INITIALIZED[0] != settings:
            raise DistributedConfigError(
                f"jax.distributed already started as {_INITIALIZED[0].describe()}"
            )
        return settings
    if not settings.is_multiprocess:
        if cpu_devices is not None:
            simulate_cpu_devices(cpu_devices)
        return settings
    if backends_started():
        raise DistributedConfigError(
            "multihost.initialize() must run before any jax computation (jax already started "
            f"with {jax.device_count()} device(s)); call it first in the program"
        )
    if cpu_devices is not None:
        check_int("cpu_devices", cpu_devices, DistributedConfigError)
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or cpu_devices is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {
        "initialization_timeout": settings.initialization_timeout_s,
        "heartbeat_timeout_seconds": settings.heartbeat_timeout_s,
        "shutdown_timeout_seconds": settings.shutdown_timeout_s,
    }
    if settings.mode != "jax":
        kwargs.update(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids)
            if settings.local_device_ids is not None
            else None,
        )
    jax.distributed.initialize(**kwargs)
    if settings.mode == "jax":
        settings = dataclasses.replace(
            settings, num_processes=jax.process_count(), process_id=jax.process_index()
        )
    _INITIALIZED.append(settings)
    _quiet_other_processes(settings.process_id)
    get_logger().info(
        "jax.distributed: %s; %d devices (%d local)",
        settings.describe(),
        jax.device_count(),
        jax.local_device_count(),
    )
    return settings


class _PrimaryInfoFilter(logging.Filter):
    """Drops lf_jax records below WARNING on processes other than 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _quiet_other_processes(process_id: int) -> None:
    from lf_jax.console import get_logger

    logger = get_logger()
    if process_id != 0 and not any(isinstance(f, _PrimaryInfoFilter) for f in logger.filters):
        logger.addFilter(_PrimaryInfoFilter())
