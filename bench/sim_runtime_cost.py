"""What simulated CPU devices charge per program and per collective, whatever the work.

Usage: python bench/sim_runtime_cost.py [SECONDS_PER_CELL]

One process with 8 simulated CPU devices (``--xla_force_host_platform_device_count``)
runs tiny shard_map programs ([8 x devices, 16] float32, donated) on the first device
and on all 8, each for SECONDS_PER_CELL (default 3) after a warm-up, and prints process
CPU ms (user + sys) and voluntary context switches per call:

- ``empty``: one elementwise op (the launch of one program per device);
- ``thunks K``: K chained small sorts (XLA:CPU runs each as its own thunk: the runtime's
  cost per op and device);
- ``psum K`` / ``all_to_all K``: K chained collectives over the devices (8 devices
  only: the rendezvous of the device threads, nothing to copy).

On 8 simulated devices every device runs its own copy of the program on the host's
cores, so a step's fixed cost per op is paid once per device: the embedding step's
8 / 1 device CPU ratio carries that cost beside the exchange's copies
(bench/BENCHMARKS.md, "The simulated devices' fixed cost").

Example:
    python bench/sim_runtime_cost.py 3
"""

import os
import resource
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

AXIS = "d"


def program(kind: str, count: int):
    """The per-device body: ``count`` chained ops of ``kind`` on a [8, 16] block."""

    def body(x):
        if kind == "empty":
            return x + 1.0
        for i in range(count):
            if kind == "thunks":
                x = jnp.sort(x * (1.0 + i), axis=-1)
            elif kind == "psum":
                x = x + jax.lax.psum(x, AXIS)
            elif kind == "all_to_all":
                x = jax.lax.all_to_all(x, AXIS, 0, 0, tiled=True) + 1.0
            else:
                raise ValueError(f"kind must be empty, thunks, psum or all_to_all, got {kind!r}")
        return x

    return body


def cost_per_call(devices: int, kind: str, count: int, seconds: float) -> tuple[float, float]:
    """(process CPU ms, voluntary context switches) per call of the program on
    ``devices`` simulated devices."""
    mesh = Mesh(np.array(jax.devices()[:devices]), (AXIS,))
    step = jax.jit(
        jax.shard_map(program(kind, count), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)),
        donate_argnums=0,
    )
    x = jax.device_put(jnp.ones((8 * devices, 16)), NamedSharding(mesh, P(AXIS)))
    for _ in range(20):
        x = step(x)
    jax.block_until_ready(x)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0, calls = time.process_time(), time.time(), 0
    while time.time() - wall0 < seconds:
        x = jax.block_until_ready(step(x))
        calls += 1
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    return (time.process_time() - cpu0) / calls * 1e3, (usage1.ru_nvcsw - usage0.ru_nvcsw) / calls


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    cells = [("empty", 1), ("thunks", 10), ("thunks", 100), ("psum", 1), ("psum", 16)]
    cells.append(("all_to_all", 16))
    header = f"{'1 device: CPU ms / switches':>28s} {'8 devices: CPU ms / switches':>30s}"
    print(f"{'program':16s} {header}")
    for kind, count in cells:
        row = []
        for devices in (1, 8):
            if kind in ("psum", "all_to_all") and devices == 1:
                row.append(f"{'-':>28s}")
                continue
            ms, switches = cost_per_call(devices, kind, count, seconds)
            row.append(f"{ms:18.3f} / {switches:7.1f}")
        print(f"{kind + ' ' + str(count):16s} {row[0]} {row[1]:>30s}", flush=True)


if __name__ == "__main__":
    main()
