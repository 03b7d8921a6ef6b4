"""The accelerators one process drives on its node, read from the scheduler's environment.

Left unset under SLURM, ``jax.distributed.initialize`` (jax 0.10.2) fills
``local_device_ids=[SLURM_LOCALID]``: with one process per node every node would drive
only its GPU 0. lf_jax therefore passes the node's visible GPUs itself when a scheduler
started the job (SLURM, GKE JobSet):

  * the visible GPUs are counted from, in order: ``CUDA_VISIBLE_DEVICES``,
    ``ROCR_VISIBLE_DEVICES`` / ``HIP_VISIBLE_DEVICES``, ``SLURM_GPUS_ON_NODE``,
    ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``, else the node's ``/dev/nvidiaN`` files;
    the ids are process-local ordinals ``0 .. n-1`` (CUDA renumbers the visible set);
  * one task on the node (``--ntasks-per-node=1``, what launch/slurm/train.sbatch asks
    for): all of them;
  * several tasks on the node, or no GPU found (CPU, TPU): None, jax's own default
    (one device per local rank on GPUs; every device otherwise).

``LF_JAX_LOCAL_DEVICE_IDS`` (or ``local_device_ids`` in config.distributed) always wins.

Example:
    >>> node_local_device_ids({"SLURM_PROCID": "1", "SLURM_NTASKS": "4",
    ...                        "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    (0, 1, 2, 3)
"""

import re
from collections.abc import Mapping
from pathlib import Path

from lf_jax.errors import UserInputError

_VISIBLE_LISTS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


class NodeDevicesError(UserInputError):
    """A scheduler variable describing the node's devices or tasks that cannot be read."""


def _count(name: str, raw: str) -> int:
    if not raw.strip().isdigit():
        raise NodeDevicesError(f"{name}={raw!r} must be a non-negative integer")
    return int(raw)


def visible_gpu_count(env: Mapping[str, str], dev_dir: str | Path = "/dev") -> int:
    """How many GPUs this process can see on its node (0 when none is found)."""
    for name in _VISIBLE_LISTS:
        if name in env:
            items = [item for item in env[name].split(",") if item.strip()]
            return 0 if items in ([], ["NoDevFiles"]) else len(items)
    if env.get("SLURM_GPUS_ON_NODE"):
        return _count("SLURM_GPUS_ON_NODE", env["SLURM_GPUS_ON_NODE"])
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(name):
            return len([item for item in env[name].split(",") if item.strip()])
    directory = Path(dev_dir)
    if not directory.is_dir():
        return 0
    return sum(1 for path in directory.iterdir() if re.fullmatch(r"nvidia\d+", path.name))


def tasks_on_node(env: Mapping[str, str]) -> int:
    """SLURM tasks sharing this node: SLURM_NTASKS_PER_NODE, else this node's entry of
    SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE (``"2(x3),1"``: nodes 0-2 run 2
    tasks, node 3 one), indexed by SLURM_NODEID; 1 when none is set."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _count("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS_PER_NODE"])
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = env.get(name)
        if not raw:
            continue
        counts: list[int] = []
        for part in raw.split(","):
            match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
            if not match:
                raise NodeDevicesError(f"{name}={raw!r} is not like '2(x3),1'")
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = _count("SLURM_NODEID", env.get("SLURM_NODEID", "0"))
        if node >= len(counts):
            raise NodeDevicesError(f"SLURM_NODEID={node} is beyond {name}={raw!r}")
        return counts[node]
    return 1


def node_local_device_ids(
    env: Mapping[str, str], dev_dir: str | Path = "/dev"
) -> tuple[int, ...] | None:
    """The local device ids one process per node should drive (see the module docstring)."""
    gpus = visible_gpu_count(env, dev_dir)
    if gpus == 0 or tasks_on_node(env) != 1:
        return None
    return tuple(range(gpus))
