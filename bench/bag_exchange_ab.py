"""The 8-device step with bag mode against the rows exchange and the 1-device step.

Usage: PYTHONPATH=. python bench/bag_exchange_ab.py {uniform,zipf} ROUNDS [MODES]

One process with 8 simulated CPU devices builds bench/embedding.py's step (8 tables x
1e6 x 64, batch 4096, bags of 1-20 ids, row-wise Adagrad) three times: on 1 device
(data_parallel) and on 8 (row_wise, capacities from the traffic, as
bench/step_scale_ab.py) with each exchange of MODES (comma-separated
``EmbeddingCollection(exchange=...)`` values, default ``rows,bags``: keys out and rows
back, or entries out and partial bags pooled at the owners, lf_jax.embedding.bag_exchange;
``auto`` probes both and keeps the one moving fewer bytes). Runs them alternately, 5
steps each per round, ROUNDS rounds after 2 warm-up rounds (``auto`` settles its mode
there), and prints the median process CPU ms (user + sys) per step of each and the
8 / 1 ratios. Peak RSS ~15 GB with two modes.

Example:
    PYTHONPATH=. python bench/bag_exchange_ab.py uniform 8 rows,auto
"""

import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).parent))

import embedding as bench  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from traffic_step import TrafficStep  # noqa: E402

STEPS = 5  # per step kind and round


def build(dist: str, devices: int, exchange: str):
    """A run() closure: one donated step on the next batch, blocked."""
    cfg = {
        **bench.step_config(dist, devices),
        "mesh_devices": jax.devices()[:devices],
        "capacities": "traffic",
        "exchange": exchange,
    }
    coll, batches, r_d, jitted = bench._build_ours(cfg)
    box = {"state": jax.block_until_ready(coll.init(jax.random.key(0))), "i": 0}
    step = TrafficStep(coll, jitted, r_d, cfg["batch"])

    def run():
        box["state"], _ = step(box["state"], batches[box["i"] % len(batches)])
        jax.block_until_ready(box["state"])
        box["i"] += 1

    auto = [r.group.name for r in coll.routes if len(r.modes) > 1]
    while len(step.chooser.chosen) < len(auto):  # auto: settle each group's mode first
        run()
    if auto:
        print(f"auto ({dist}): {step.chooser.chosen}, probed {step.chooser.probed}", flush=True)
    return run


def main() -> None:
    dist, rounds = sys.argv[1], int(sys.argv[2])
    modes = (sys.argv[3] if len(sys.argv) > 3 else "rows,bags").split(",")
    runs = {"1 device": build(dist, 1, "rows")}
    runs.update({f"8 {mode}": build(dist, 8, mode) for mode in modes})
    times: dict = {name: [] for name in runs}
    for r in range(rounds + 2):
        for name, run in runs.items():
            for _ in range(STEPS):
                c0 = time.process_time()
                run()
                if r >= 2:
                    times[name].append((time.process_time() - c0) * 1e3)
    med = {name: float(np.median(t)) for name, t in times.items()}
    one = med["1 device"]
    print(
        f"{dist}: median CPU ms per step "
        + ", ".join(f"{name} {v:.1f}" for name, v in med.items())
        + "; "
        + ", ".join(f"{name} / 1 {v / one:.2f}x" for name, v in med.items() if name[0] == "8"),
        flush=True,
    )


if __name__ == "__main__":
    main()
