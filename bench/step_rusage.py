"""One embedding step, 8 tables x 1e6 x 64: user and system CPU ms and page faults per step.

Usage: python bench/step_rusage.py {uniform,zipf} {1,8} TREE
TREE is the source tree whose bench/embedding.py builds the step (run with
PYTHONPATH=TREE too), so that a copy of an older commit can be measured beside the
current one (A/B in one session). Same workload as bench/step_profile.py; prints the
median over 6 timed steps of getrusage user and system time and minor page faults,
the compiled step's XLA temp bytes and the last loss.

glibc serves XLA's large temp buffers with fresh mmaps, faulted in again every step (the
temp bytes / 4 KiB minor faults per step and device); with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296`` in the environment freed
buffers stay in the heap and are reused. The line printed names the setting in force.
"""

import os
import resource
import sys

DIST, DEVICES, TREE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if DEVICES > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
sys.path.insert(0, os.path.join(TREE, "bench"))

import embedding as bench  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    cfg = {
        "num_tables": 8,
        "vocab": 1_000_000,
        "dim": 64,
        "max_ids": 20,
        "batch": 4096,
        "seed": 0,
        "num_batches": 3,
        "dist": DIST,
        "devices": DEVICES,
        "plan": "data_parallel" if DEVICES == 1 else "row_wise",
    }
    coll, batches, r_d, jitted = bench._build_ours(cfg)
    state = jax.block_until_ready(coll.init(jax.random.key(0)))
    compiled = jitted.lower(state, batches[0], r_d).compile()
    for i in range(2):
        state, loss = compiled(state, batches[i % 3], r_d)
        jax.block_until_ready(state)
    rows = []
    for i in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF)
        state, loss = compiled(state, batches[i % 3], r_d)
        jax.block_until_ready((state, loss))
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append(
            (
                after.ru_utime - before.ru_utime,
                after.ru_stime - before.ru_stime,
                after.ru_minflt - before.ru_minflt,
            )
        )
    user, system, faults = np.median(np.array(rows), axis=0)
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 1e6
    print(
        f"{DIST} devices={DEVICES} {TREE}: user ms {user * 1e3:.0f} sys ms {system * 1e3:.0f} "
        f"minflt {faults:.0f} temp MB {temp_mb:.0f} loss {float(loss):.6f} "
        f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}"
    )


if __name__ == "__main__":
    main()
