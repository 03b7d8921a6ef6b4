"""The planner's per-device memory estimate next to XLA's compiled figures (compile only).

For a feed-ranker config and each device count (mesh data = N / 8 x model = 8), in a
fresh subprocess with N simulated CPU devices:

  1. plan_tables on the config's tables and features (the config's hand plan wins);
  2. the embedding step (lookup + backward of a sum-of-squares loss + sparse update of
     every table) compiled on abstract state: XLA's argument + temp bytes per device
     next to the planner's weights + slots + activations, and their ratio;
  3. with --full-step, the whole ranker train step (FeedRanker, AdamW, IPS-weighted BCE,
     the embedding update) compiled the same way: nothing is materialised, so the
     3-billion-parameter production config compiles on a 2-core machine.

The planner prices the XLA path of the sparse step (the path GPU / TPU run), so the
step is compiled with ``--kernel xla`` by default. With ``--kernel auto`` on the CPU the
fused C++ kernel (lf_jax.embedding.kernels) does the local pooling and updates with its
own scratch outside XLA's buffers: XLA's figure then leaves it out and the planner's
activation terms are an upper bound (large config: XLA args + temp 0.174 GB at 8
devices and 0.115 GB at 64 against the XLA path's 0.458 and 0.399).

Usage:
    .venv/bin/python bench/plan_vs_xla.py --config configs/feed_ranker.py:size=production \\
        --devices 8,64 --full-step --output /tmp/plan_vs_xla_production.json
    .venv/bin/python bench/plan_vs_xla.py --config configs/feed_ranker.py:size=large --devices 8,64
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("like", "comment", "share", "long_dwell")  # data/feed_logs tasks
NUM_DENSE = 8  # data/feed_logs dense features


def _abstract(tree, sharding):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _compiled_figures(compiled) -> dict:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "gflop": cost.get("flops", 0.0) / 1e9,
    }


def measure(config_arg: str, devices: int, full_step: bool) -> dict:
    """Plans and compiles on ``devices`` simulated devices; returns the figures."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from lf_jax.configuration import load_config
    from lf_jax.distributed.mesh import make_mesh
    from lf_jax.embedding.collection import EmbeddingCollection, SparseBatch
    from lf_jax.embedding.config_specs import memory_budget_from_config, specs_from_config
    from lf_jax.losses import weighted_bce
    from lf_jax.models.ranker import FeedRanker
    from lf_jax.planner import plan_tables
    from lf_jax.testing.abstract import abstract_state
    from lf_jax.train.step import dense_optimizer, init_train_state, make_train_step

    config = load_config(config_arg)
    mesh = make_mesh({"data": devices // 8, "model": 8})
    tables, features, hand_plan = specs_from_config(config.embedding)
    batch_size = config.batch_size
    result = plan_tables(
        tables,
        features,
        dict(mesh.shape),
        batch_size,
        memory_budget_from_config(config.embedding),
        hand_plan,
    )
    coll = EmbeddingCollection(tables, features, result.plan, mesh)
    rows = batch_size

    def sparse_batch(leading=()):
        sharding = NamedSharding(mesh, PartitionSpec(*([None] * len(leading)), mesh.axis_names))
        spec = lambda f, dtype: jax.ShapeDtypeStruct(  # noqa: E731
            (*leading, rows, f.max_ids), dtype, sharding=sharding
        )
        return SparseBatch(
            ids={f.name: spec(f, np.int32) for f in features},
            weights={f.name: spec(f, np.float32) for f in features},
        )

    def embedding_step(state, batch):
        acts = coll.lookup(state["tables"], batch)
        grads = jax.grad(lambda a: sum(jax.numpy.sum(v * v) for v in a.values()))(acts)
        return coll.apply_gradients(state, batch, grads)

    start = time.process_time()
    compiled = (
        jax.jit(embedding_step, donate_argnums=0)
        .lower(abstract_state(coll), sparse_batch())
        .compile()
    )
    xla = _compiled_figures(compiled)
    planner_bytes = result.weight_bytes + result.activation_bytes
    report = {
        "config": config_arg,
        "devices": devices,
        "mesh": dict(mesh.shape),
        "plan": {row.table: row.strategy for row in result.rows},
        "planner_weight_bytes": result.weight_bytes,
        "planner_activation_bytes": result.activation_bytes,
        "planner_bytes": planner_bytes,
        "planner_exchange_bytes": result.comm_bytes,
        "embedding_step": xla,
        "xla_bytes": xla["argument_bytes"] + xla["temp_bytes"],
        "ratio_planner_to_xla": planner_bytes / (xla["argument_bytes"] + xla["temp_bytes"]),
        "embedding_compile_cpu_s": time.process_time() - start,
    }
    if full_step:
        field_dims = {f.name: coll.tables[f.table].dim for f in features}
        model = FeedRanker(
            field_dims=field_dims,
            num_dense=NUM_DENSE,
            tasks=TASKS,
            **config.model.to_dict(),
            rngs=nnx.Rngs(0),
        )
        graphdef, params = nnx.split(model)
        tx = dense_optimizer(config.train)
        replicated = NamedSharding(mesh, PartitionSpec())
        state = jax.eval_shape(lambda p: init_train_state(p, tx, {}), params)
        state = _abstract(state, replicated)
        state["embedding"] = abstract_state(coll)

        def loss_fn(model, activations, micro):
            logits_bt = model(activations, micro["dense"])
            per_task_t = weighted_bce(logits_bt, micro["labels"], micro["weights"])
            return jax.numpy.sum(per_task_t), per_task_t

        k = config.train.grad_accum_steps
        rows = batch_size // k
        example = NamedSharding(mesh, PartitionSpec(None, mesh.axis_names))
        batch = {
            "sparse": sparse_batch((k,)),
            "dense": jax.ShapeDtypeStruct((k, rows, NUM_DENSE), np.float32, sharding=example),
            "labels": jax.ShapeDtypeStruct((k, rows, len(TASKS)), np.float32, sharding=example),
            "weights": jax.ShapeDtypeStruct((k, rows, len(TASKS)), np.float32, sharding=example),
        }
        start = time.process_time()
        step = make_train_step(graphdef, coll, tx, loss_fn)
        report["full_step"] = _compiled_figures(step.lower(state, batch).compile())
        report["full_step_compile_cpu_s"] = time.process_time() - start
        report["dense_parameters"] = int(sum(x.size for x in jax.tree.leaves(params)))
    report["embedding_parameters"] = int(sum(t.vocab_size * t.dim for t in tables))
    return report


def run_one(
    config_arg: str, devices: int, full_step: bool, timeout: float, kernel: str = "xla"
) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["LF_JAX_EMBEDDING_KERNEL"] = kernel
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import plan_vs_xla; "
        f"print('RESULT', json.dumps(plan_vs_xla.measure({config_arg!r}, {devices}, "
        f"{full_step})))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"config": config_arg, "devices": devices, "error": f"timeout after {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = done.stderr.strip().splitlines()[-3:] or ["no output"]
    return {"config": config_arg, "devices": devices, "error": " | ".join(tail)}


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['config']}  {r['devices']} devices: error: {r['error']}"
    gb = lambda x: f"{x / 1e9:.3f} GB"  # noqa: E731
    e = r["embedding_step"]
    line = (
        f"{r['config']}  {r['devices']:>3} devices  planner {gb(r['planner_bytes'])} "
        f"(weights {gb(r['planner_weight_bytes'])} + act {gb(r['planner_activation_bytes'])})"
        f"  XLA args {gb(e['argument_bytes'])} + temp {gb(e['temp_bytes'])}"
        f"  planner/XLA {r['ratio_planner_to_xla']:.3f}"
    )
    if "full_step" in r:
        f = r["full_step"]
        line += (
            f"\n    full train step: args {gb(f['argument_bytes'])} + temp {gb(f['temp_bytes'])},"
            f" {f['gflop']:.1f} GFLOP/device, compiled in {r['full_step_compile_cpu_s']:.0f} CPU-s"
        )
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/feed_ranker.py:size=production")
    parser.add_argument("--devices", default="8,64")
    parser.add_argument("--full-step", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--output", default="")
    parser.add_argument("--kernel", default="xla", choices=("xla", "auto", "fused"))
    args = parser.parse_args(argv)
    results = []
    for devices in (int(d) for d in args.devices.split(",")):
        results.append(run_one(args.config, devices, args.full_step, args.timeout, args.kernel))
        print(format_row(results[-1]), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
