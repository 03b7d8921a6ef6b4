"""In-process A/B of the 1-device embedding step: two (or more) source trees, one process.

Usage: python bench/step_ab.py {uniform,zipf} TABLES VOCAB ROUNDS TREE_A TREE_B [...]

Each TREE's ``lf_jax`` package is copied to a temporary directory under its own name
(``lf_jax_t0``, ``lf_jax_t1``, ... with its imports rewritten), so that every tree's
step is built and compiled in this one process; the steps then run alternately, ROUNDS
times each after 2 warm-up rounds, and the median / min / 25th percentile of each
one's process CPU time (user + sys) per step is printed with its first losses. Other
processes' load hits every tree alike, which separate processes per tree do not give
on a shared machine. Workload: bench/embedding.py's (batch 4096, dim 64, bags of 1-20
ids, row-wise Adagrad, data_parallel on one CPU device, id_fill from the batches).
Trees whose fused-kernel sources (lf_jax/embedding/kernels/sparse_step.cc) differ cannot
share one process: XLA refuses a second registration of the kernels' FFI targets from
another library. Compare those one process per tree (``LF_JAX_EMBEDDING_KERNEL=xla``
compares their XLA paths in one process).

Example (the base checkout beside the working tree):
    PYTHONPATH=. python bench/step_ab.py uniform 8 1e6 10 /work/base-19 .
"""

import re
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import embedding as bench  # noqa: E402
import jax  # noqa: E402


def copy_package(tree: str, name: str, into: Path) -> None:
    """tree/lf_jax -> into/name with every ``lf_jax`` import renamed."""
    target = into / name
    shutil.copytree(Path(tree) / "lf_jax", target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        path.write_text(re.sub(r"\blf_jax\b", name, path.read_text()))


def build(pkg: str, cfg: dict):
    """A run() closure: one donated step of ``pkg``'s collection on the next batch."""
    coll, batches, r_d, jitted = bench._build_ours({**cfg, "plan": "data_parallel"}, pkg)
    state = jax.block_until_ready(coll.init(jax.random.key(0)))
    compiled = jitted.lower(state, batches[0], r_d).compile()
    box = {"state": state, "i": 0, "losses": []}

    def run():
        batch = batches[box["i"] % len(batches)]
        box["state"], loss = compiled(box["state"], batch, r_d)
        jax.block_until_ready(box["state"])
        box["i"] += 1
        box["losses"].append(float(loss))

    memory = compiled.memory_analysis()
    if memory is None:
        raise RuntimeError(f"{pkg}: XLA gave no memory analysis of the compiled step")
    return run, box, memory.temp_size_in_bytes / 1e6


def cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def main() -> None:
    dist, tables, vocab, rounds, *trees = sys.argv[1:]
    cfg = bench.step_config(dist, 1, int(tables), int(float(vocab)))
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        runs = {}
        for i, tree in enumerate(trees):
            copy_package(tree, f"lf_jax_t{i}", Path(tmp))
            runs[tree] = build(f"lf_jax_t{i}", cfg)
            print(f"{tree}: XLA temp {runs[tree][2]:.1f} MB", flush=True)
        times: dict[str, list[float]] = {tree: [] for tree in trees}
        for r in range(int(rounds) + 2):
            for tree, (run, _, _) in runs.items():
                start = cpu_ms()
                run()
                if r >= 2:
                    times[tree].append(cpu_ms() - start)
    for tree, cpu in times.items():
        print(
            f"{tree}: CPU ms per step median {np.median(cpu):.1f} min {min(cpu):.1f} "
            f"p25 {np.percentile(cpu, 25):.1f}; losses {runs[tree][1]['losses'][:3]}"
        )


if __name__ == "__main__":
    main()
