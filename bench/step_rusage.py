"""One embedding step, 8 tables x 1e6 x 64: user and system CPU ms and page faults per step.

Usage: python bench/step_rusage.py {uniform,zipf} {1,8} TREE [traffic]
TREE is the source tree whose bench/embedding.py builds the step (run with
PYTHONPATH=TREE too), so that a copy of an older commit can be measured beside the
current one (A/B in one session). Same workload as bench/step_profile.py; prints the
median over 6 timed steps of getrusage user and system time and minor page faults,
the compiled step's XLA temp bytes and the last loss.

``traffic``: exchange capacities from the traffic (lf_jax.embedding.capacity): the
first step runs with the static capacities, each step returns its exchange counts, a
CapacityChooser picks the capacities of the next steps (each count observed one step
late, as a trainer would); the line adds the capacities used and the compiles.

glibc serves XLA's large temp buffers with fresh mmaps, faulted in again every step (the
temp bytes / 4 KiB minor faults per step and device) unless mmap is off for them:
``import lf_jax`` turns it off (lf_jax.distributed.devices.keep_freed_memory; opt out
with LF_JAX_MALLOC=default), as does ``MALLOC_MMAP_MAX_=0`` in the environment. The line
printed says which was in force (measured: does a 64 MiB malloc get an mmap?), the
process's peak RSS and its anonymous huge pages (EmbeddingCollection.init backs CPU
tables with them: lf_jax.embedding.huge_pages).
"""

import ctypes
import os
import re
import resource
import sys
from pathlib import Path

DIST, DEVICES, TREE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
TRAFFIC = sys.argv[4:] == ["traffic"]
if DEVICES > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
sys.path.insert(0, os.path.join(TREE, "bench"))

import embedding as bench  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from traffic_step import TrafficStep  # noqa: E402  (this script's directory)


def _malloc_mmaps_large_blocks() -> bool:
    """Whether glibc serves a fresh 64 MiB malloc with an mmap (mallinfo2's hblkhd)."""
    libc = ctypes.CDLL("libc.so.6")
    fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    info = type(
        "MallInfo2",
        (ctypes.Structure,),
        {"_fields_": [(n, ctypes.c_size_t) for n in fields.split()]},
    )
    libc.mallinfo2.restype = info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    grew = libc.mallinfo2().hblkhd - before >= 64 << 20
    libc.free(block)
    return grew


def main() -> None:
    cfg = bench.step_config(DIST, DEVICES)
    if TRAFFIC:
        cfg["capacities"] = "traffic"
    coll, batches, r_d, jitted = bench._build_ours(cfg)
    state = jax.block_until_ready(coll.init(jax.random.key(0)))
    if TRAFFIC:
        run = TrafficStep(coll, jitted, r_d, cfg["batch"])
        # the first warm-up step: its counts size the next steps, and the compile of
        # their capacities happens before the timed steps
        state, loss = run.settle(state, batches[0])
        first = 1
    else:
        first = 0
        compiled = jitted.lower(state, batches[0], r_d).compile()

        def run(state, batch):
            return compiled(state, batch, r_d)

    for i in range(first, 2):  # 2 warm-up steps in all, as the static capacities' run
        state, loss = run(state, batches[i % 3])
        jax.block_until_ready(state)
    rows = []
    for i in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF)
        state, loss = run(state, batches[i % 3])
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
    if TRAFFIC:
        compiled = run.current()
        print(f"capacities compiled {list(run.compiled)}, static {run.chooser.static}")
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 1e6 if compiled else float("nan")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux
    malloc = "mmap" if _malloc_mmaps_large_blocks() else "heap"
    rollup = Path("/proc/self/smaps_rollup")
    huge = re.search(r"AnonHugePages:\s+(\d+)", rollup.read_text()) if rollup.exists() else None
    print(
        f"{DIST} devices={DEVICES} {TREE}: user ms {user * 1e3:.0f} sys ms {system * 1e3:.0f} "
        f"minflt {faults:.0f} temp MB {temp_mb:.0f} loss {float(loss):.6f} "
        f"peak RSS MB {peak_mb:.0f} large mallocs {malloc} "
        f"huge pages MB {int(huge.group(1)) / 1e3 if huge else float('nan'):.0f} "
        f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}"
    )


if __name__ == "__main__":
    main()
