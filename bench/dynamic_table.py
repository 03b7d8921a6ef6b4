"""Dynamic vs static table: ms per training step (resolve + lookup + row-wise Adagrad).

One table of ROWS rows, dim 32, batch 1024 of bags of 8 ids, on 1 CPU device and on 8
simulated CPU devices. Static: row ids uniform in [0, ROWS). Dynamic: the same number of
rows as capacity, keys uniform over ROWS / 2 distinct 64-bit keys (warmed up, so most
steps hit; lru eviction). The two steps alternate within one process so machine-load
drift hits both alike; reported: median wall and process-CPU ms per step and their ratio.
Both steps donate their state, as the trainer's steps do (``--no-donate``: each step
also copies its table and optimizer slots, the bench's behaviour before 2026-12-06).
``--batches N`` cycles N batches (default 4: timed steps hit every key); with more
batches than warm-up plus timed steps (e.g. 60) every timed step reads a batch not
seen before and inserts keys.

Usage (a fresh process per device count):
    .venv/bin/python bench/dynamic_table.py --devices 8 --steps 10
"""

import argparse
import functools
import json
import os
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2**17)
    parser.add_argument("--no-donate", action="store_true")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import numpy as np

    from lf_jax.distributed.mesh import make_mesh
    from lf_jax.embedding import (
        EmbeddingCollection,
        FeatureSpec,
        TableSpec,
        row_wise,
        rowwise_adagrad,
    )
    from lf_jax.embedding.dynamic.policy import DynamicPolicy
    from lf_jax.embedding.dynamic.tables import DynamicTables

    batch, bag, dim = 1024, 8, 32
    mesh = make_mesh({"data": args.devices})
    feature = [FeatureSpec(name="f", table="t", max_ids=bag)]

    def collection(dynamic):
        spec = TableSpec(
            name="t", vocab_size=args.rows, dim=dim, optimizer=rowwise_adagrad(0.1), dynamic=dynamic
        )
        return EmbeddingCollection([spec], feature, {"t": row_wise("data")}, mesh)

    static = collection(None)
    dyn = DynamicTables(collection(DynamicPolicy(eviction="lru")))

    def loss_grads(acts):
        return {"f": 2 * acts["f"]}

    donate = () if args.no_donate else (0,)

    @functools.partial(jax.jit, donate_argnums=donate)
    def static_step(state, batch):
        acts = static.lookup(state["tables"], batch)
        return static.apply_gradients(state, batch, loss_grads(acts))

    @functools.partial(jax.jit, donate_argnums=donate)
    def dynamic_step(state, keys):
        state, batch = dyn.resolve(state, keys)
        acts = dyn.collection.lookup(state["embedding"]["tables"], batch)
        state["embedding"] = dyn.collection.apply_gradients(
            state["embedding"], batch, loss_grads(acts)
        )
        return state

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**62, args.rows // 2)
    static_batches = [
        static.shard_batch(static.preprocess({"f": rng.integers(0, args.rows, (batch, bag))}))
        for _ in range(args.batches)
    ]
    key_batches = [
        dyn.shard_batch(dyn.preprocess({"f": rng.choice(pool, (batch, bag))}))
        for _ in range(args.batches)
    ]
    s_state, d_state = static.init(jax.random.key(0)), dyn.init(jax.random.key(0))
    for i in range(20):  # compile and warm the keys up
        d_state = dynamic_step(d_state, key_batches[i % args.batches])
    s_state = static_step(s_state, static_batches[0])
    jax.block_until_ready((s_state, d_state))
    times = {"static": [], "dynamic": []}
    for i in range(args.steps):
        for name in ("static", "dynamic"):
            wall, cpu = time.perf_counter(), time.process_time()
            if name == "static":
                s_state = jax.block_until_ready(
                    static_step(s_state, static_batches[(20 + i) % args.batches])
                )
            else:
                d_state = jax.block_until_ready(
                    dynamic_step(d_state, key_batches[(20 + i) % args.batches])
                )
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    out = {"devices": args.devices, "rows": args.rows, "batch": batch, "bag": bag}
    out["donate"], out["batches"] = not args.no_donate, args.batches
    for name, values in times.items():
        out[f"{name}_wall_ms"] = round(1e3 * float(np.median([w for w, _ in values])), 2)
        out[f"{name}_cpu_ms"] = round(1e3 * float(np.median([c for _, c in values])), 2)
    out["ratio_wall"] = round(out["dynamic_wall_ms"] / out["static_wall_ms"], 3)
    out["ratio_cpu"] = round(out["dynamic_cpu_ms"] / out["static_cpu_ms"], 3)
    out["dynamic_counters"] = dyn.counters(d_state)["t"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
