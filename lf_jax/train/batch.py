"""Host batches -> global device arrays [k, B/k, ...] with a micro-batch axis, every family.

``place_batch`` reshapes each host array [B, ...] into k micro-batches and builds one global
jax.Array per leaf, sharded by ``sharding`` on the example axis (axis 1).

  * ``rows="local"``: each process holds only its own rows (the ranker's grain pipeline);
    the global batch is the processes' rows side by side.
  * ``rows="global"``: every process holds the whole global batch (the encoders' samplers)
    and keeps its contiguous slice of each micro-batch.
  * ``groups=g``: the batch is g groups one after another (group i for data shard i);
    micro-batch m holds rows m*b/k.. of every group, so each group stays on its shard.

Example:
    >>> sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    >>> batch = place_batch({"ids": ids_bl}, 2, sharding, rows="global")
    >>> batch["ids"].shape        # (2, B/2, L)
"""

from collections.abc import Mapping
from typing import Literal

import jax
import numpy as np
from jax.sharding import Sharding

from lf_jax.checks import is_int
from lf_jax.errors import UserInputError


def check_micro_batches(batch_size: int, num_micro, unit: int, unit_name: str) -> int:
    """``num_micro`` (config train.grad_accum_steps) when ``batch_size`` splits into that
    many micro-batches of a multiple of ``unit`` (``unit_name`` says what the unit is, e.g.
    "the 8 devices"); else a UserInputError naming both config values."""
    if not is_int(num_micro) or num_micro < 1 or batch_size % (num_micro * unit):
        raise UserInputError(
            f"config batch_size={batch_size} must split into "
            f"train.grad_accum_steps={num_micro} micro-batches of a multiple of {unit_name}"
        )
    return int(num_micro)


def micro_batches(x: np.ndarray, num_micro: int, groups: int = 1) -> np.ndarray:
    """[B, ...] -> [k, B/k, ...]; with ``groups`` g, micro-batch m holds rows m*B/(g*k).. of
    each of the g consecutive groups."""
    x = np.asarray(x)
    x = x.reshape(groups, num_micro, x.shape[0] // (groups * num_micro), *x.shape[1:])
    return x.swapaxes(0, 1).reshape(num_micro, -1, *x.shape[3:])


def place_batch(
    host: Mapping,
    num_micro: int,
    sharding: Sharding,
    *,
    rows: Literal["local", "global"],
    groups: int = 1,
) -> dict:
    """Every leaf of ``host`` [B, ...] as a global jax.Array [k, B_global/k, ...]."""
    processes, index = jax.process_count(), jax.process_index()

    def place(x):
        x_kb = micro_batches(x, num_micro, groups)
        if rows == "global":
            per_process = x_kb.shape[1] // processes
            x_kb = x_kb[:, index * per_process : (index + 1) * per_process]
        global_shape = (num_micro, x_kb.shape[1] * processes, *x_kb.shape[2:])
        return jax.make_array_from_process_local_data(sharding, x_kb, global_shape)

    return jax.tree.map(place, dict(host))
