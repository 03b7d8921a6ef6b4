"""One embedding step, 8 tables x 1e6 x 64: process CPU ms per step and XLA temp bytes.

Usage: python bench/step_profile.py {uniform,zipf} {1,8}
One device uses data_parallel, more use row_wise over "data" (simulated CPU devices).
Same workload as bench/embedding.py scenario b (batch 4096, bags of 1-20 ids, row-wise
Adagrad), without the peers: a quick before/after check of engine changes.
"""

import os
import sys
from pathlib import Path

DIST = sys.argv[1] if len(sys.argv) > 1 else "uniform"
DEVICES = int(sys.argv[2]) if len(sys.argv) > 2 else 1
if DEVICES > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
sys.path.insert(0, str(Path(__file__).parent))

import embedding as bench  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    cfg = {**bench.step_config(DIST, DEVICES), "warmup": 2, "steps": 6}
    coll, batches, r_d, jitted = bench._build_ours(cfg)
    state = jax.block_until_ready(coll.init(jax.random.key(0)))
    compiled = jitted.lower(state, batches[0], r_d).compile()
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 1e6
    state, (times, cpu), loss = bench._timed_steps(
        lambda s, b: compiled(s, b, r_d), state, batches, cfg
    )
    print(
        f"{DIST} devices={DEVICES}: cpu ms {np.median(cpu) * 1e3:.0f}, "
        f"wall ms {np.median(times) * 1e3:.0f}, temp MB {temp_mb:.0f}, loss {loss:.6f}"
    )


if __name__ == "__main__":
    main()
