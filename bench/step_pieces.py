"""CPU time of the pieces of the 8-device step (routing, lookup, loss grad, update), each
jitted on its own, against the whole step: where the exchanging step's CPU goes.

Usage: PYTHONPATH=. python bench/step_pieces.py {uniform,zipf} ROUNDS [DEVICES]

Same workload as bench/step_scale_ab.py (8 tables x 1e6 x 64, batch 4096, bags of 1-20,
row-wise Adagrad; row_wise over DEVICES (default 8) simulated CPU devices; capacities
from the traffic: the chooser's after one step). Prints the median process CPU ms
(user + sys) of each piece over ROUNDS alternating rounds after 2 warm-up rounds.
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).parent))

import embedding as bench  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from step_ab import cpu_ms  # noqa: E402

from lf_jax.embedding.capacity import CapacityChooser, exchange_counts  # noqa: E402


def main() -> None:
    dist, rounds = sys.argv[1], int(sys.argv[2])
    devices = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    cfg = {
        **bench.step_config(dist, devices),
        "mesh_devices": jax.devices()[:devices],
        "capacities": "traffic",
    }
    coll, batches, r_d, step = bench._build_ours(cfg)
    state = jax.block_until_ready(coll.init(jax.random.key(0)))
    chooser = CapacityChooser(coll, cfg["batch"])
    if devices > 1:
        routing0 = jax.jit(coll.routing)(batches[0])
        chooser.observe(exchange_counts(routing0))
    caps = chooser.capacities()
    print("capacities", caps, flush=True)
    routing_fn = jax.jit(lambda b: coll.routing(b, caps) if devices > 1 else None)
    lookup_fn = jax.jit(lambda t, b, r: coll.lookup(t, b, r))
    grad_fn = jax.jit(jax.value_and_grad(bench._loss))
    update_fn = jax.jit(
        lambda s, b, g, r: coll.apply_gradients(s, b, g, routing=r), donate_argnums=0
    )
    step_fn = jax.jit(lambda s, b, r_d: step(s, b, r_d, capacities=caps), donate_argnums=0)
    times: dict = {k: [] for k in ("routing", "lookup", "loss_grad", "update", "sum", "step")}
    for i in range(rounds + 2):
        batch = batches[i % len(batches)]
        t0 = cpu_ms()
        routing = jax.block_until_ready(routing_fn(batch))
        t1 = cpu_ms()
        acts = jax.block_until_ready(lookup_fn(state["tables"], batch, routing))
        t2 = cpu_ms()
        _, g = jax.block_until_ready(grad_fn(acts, r_d))
        t3 = cpu_ms()
        state = jax.block_until_ready(update_fn(state, batch, g, routing))
        t4 = cpu_ms()
        state, _ = jax.block_until_ready(step_fn(state, batch, r_d))
        t5 = cpu_ms()
        if i >= 2:
            for k, v in zip(
                times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, t5 - t4), strict=True
            ):
                times[k].append(v)
    for k, v in times.items():
        print(f"{dist} devices={devices} {k}: median {np.median(v):.1f} min {min(v):.1f} CPU ms")


if __name__ == "__main__":
    main()
