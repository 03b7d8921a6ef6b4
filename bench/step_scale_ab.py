"""In-process A/B of the 8-device against the 1-device step, for one or more source trees.

Usage: python bench/step_scale_ab.py {uniform,zipf} ROUNDS TREE_A[:1,8] [TREE_B[:8] ...]
       [--exchange=rows|bags|auto]

One process with 8 simulated CPU devices builds, for every TREE and device count after
its colon (default 1 and 8), bench/embedding.py's step (8 tables x 1e6 x 64, batch 4096,
bags of 1-20 ids, row-wise Adagrad; data_parallel on the first device, row_wise over
all 8) with that tree's ``lf_jax`` (copied under its own name, as bench/step_ab.py
does), then runs the steps alternately, ROUNDS times each after 2 warm-up rounds: other
processes' load hits every step alike. A tree that has lf_jax/embedding/capacity.py
takes its exchange capacities from the traffic (a CapacityChooser observing every
step's counts, one step late; the first warm-up round uses the static capacities).
``--exchange`` sets the 8-device steps' ``EmbeddingCollection(exchange=...)`` (default
rows; ``auto`` settles its mode before the rounds).
Trees with different fused-kernel sources cannot share a process (see bench/step_ab.py).
Prints each step's median / min / 25th percentile of process CPU ms (user + sys) per
step, its median wall ms, its capacities and compiles, and every tree's 8 / 1 ratio of
CPU medians (a tree without a 1-device step is compared with the first tree's).

Example:
    PYTHONPATH=. python bench/step_scale_ab.py zipf 12 /work/base-14:1,8 .:8
"""

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).parent))

import embedding as bench  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from step_ab import copy_package, cpu_ms  # noqa: E402
from traffic_step import TrafficStep  # noqa: E402


def build(pkg: str, tree: str, devices: int, dist: str, exchange: str = "rows"):
    """A run() closure: one donated step of ``pkg``'s collection on the next batch, and
    the compiled steps by capacities."""
    traffic = (Path(tree) / "lf_jax/embedding/capacity.py").exists()
    cfg = {
        **bench.step_config(dist, devices),
        "mesh_devices": jax.devices()[:devices],
        **({"capacities": "traffic"} if traffic else {}),
        **({"exchange": exchange} if exchange != "rows" else {}),
    }
    coll, batches, r_d, jitted = bench._build_ours(cfg, pkg)
    box = {"state": jax.block_until_ready(coll.init(jax.random.key(0))), "i": 0}
    if traffic:
        step = TrafficStep(coll, jitted, r_d, cfg["batch"], pkg)
        compiled = step.compiled
        auto = [r.group.name for r in coll.routes if len(r.modes) > 1]
        while len(step.chooser.chosen) < len(auto):  # auto: settle each group's mode first
            box["state"], _ = step(box["state"], batches[box["i"] % len(batches)])
            box["i"] += 1
    else:
        compiled = {None: jitted.lower(box["state"], batches[0], r_d).compile()}

        def step(state, batch):
            return compiled[None](state, batch, r_d)

    def run():
        box["state"], _ = step(box["state"], batches[box["i"] % len(batches)])
        jax.block_until_ready(box["state"])
        box["i"] += 1

    return run, compiled


def main() -> None:
    options = [a for a in sys.argv[1:] if a.startswith("--exchange=")]
    dist, rounds, *specs = [a for a in sys.argv[1:] if a not in options]
    exchange = options[-1].split("=", 1)[1] if options else "rows"
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        for i, spec in enumerate(specs):
            tree, _, counts = spec.partition(":")
            copy_package(tree, f"lf_jax_t{i}", Path(tmp))
            for devices in [int(c) for c in (counts or "1,8").split(",")]:
                runs[(tree, devices)] = build(f"lf_jax_t{i}", tree, devices, dist, exchange)
                print(f"built {tree} on {devices} device(s)", flush=True)
        times: dict = {key: [] for key in runs}
        walls: dict = {key: [] for key in runs}
        for r in range(int(rounds) + 2):
            for key, (run, _) in runs.items():
                start, wall = cpu_ms(), time.perf_counter()
                run()
                if r >= 2:
                    times[key].append(cpu_ms() - start)
                    walls[key].append((time.perf_counter() - wall) * 1e3)
    medians = {}
    for (tree, devices), cpu in times.items():
        medians[(tree, devices)] = float(np.median(cpu))
        print(
            f"{dist} {tree} devices={devices}: CPU ms per step median {np.median(cpu):.1f} "
            f"min {min(cpu):.1f} p25 {np.percentile(cpu, 25):.1f}; "
            f"wall ms median {np.median(walls[(tree, devices)]):.1f}; "
            f"compiled {list(runs[(tree, devices)][1])}"
        )
    one = next(m for (_, d), m in medians.items() if d == 1)
    for (tree, devices), median in medians.items():
        if devices == 8:
            base = medians.get((tree, 1), one)
            print(f"{dist} {tree}: 8 / 1 devices {median / base:.2f}x")


if __name__ == "__main__":
    main()
