"""Per-device cost of one embedding step at 8 ... 256 simulated devices (compile only).

The step is one lookup + backward of a sum-of-squares loss + row-wise Adagrad update of
``--tables`` tables x ``--vocab`` rows x dim ``--dim``, bags of ``--max-ids`` ids, sum
combiner, ``--per-device`` examples per device. Nothing is materialised: the state and
batch are ShapeDtypeStructs, the step is ``jax.jit(step).lower(...).compile()``, and the
figures are XLA's per-device ``cost_analysis()`` flops, ``memory_analysis()`` temp and
argument bytes, and the bytes each device receives through the collectives in the
optimized HLO (``lf_jax.testing.hlo.collective_bytes``).

Mesh: ``data = N / model`` x ``model = --model`` (8). Strategies:

  row_wise_all          every table row_wise over (data, model)
  table_wise_row_wise   table i rows-split over ``model`` inside group i mod G (G = N /
                        model groups); tables scale with groups: max(--tables, G) tables,
                        each read by a bag of --tables * --max-ids / tables ids, so an
                        example always reads the same number of ids
  column_wise           every table column_wise(4), pieces placed table-wise
  table_wise            every table whole on one device
  data_parallel         every table replicated

Each device count runs in its own subprocess (XLA's device count is fixed at start-up).
``--exchange bags``: groups spread over every device exchange pooled partial bags
(lf_jax.embedding.bag_exchange; on ``--kernel xla`` its XLA path, lf_jax.embedding.bag_xla).
The step is compiled with ``--kernel xla`` by default: on the CPU the fused C++ kernels
(``kernel=auto``) do the routing, gathers, pooling and updates as FFI calls, whose work
and scratch XLA's cost_analysis / memory_analysis do not see; ``--kernel auto`` shows
what XLA itself still does around them.

Usage:
    .venv/bin/python bench/scaling.py --devices 8,16,32,64,256 --output /tmp/scaling.json
    .venv/bin/python bench/scaling.py --devices 8,64 --strategies row_wise_all --vocab 1e6
    .venv/bin/python bench/scaling.py --devices 8,64,256 --strategies row_wise_all --exchange bags
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("row_wise_all", "table_wise_row_wise", "column_wise", "table_wise", "data_parallel")


def _plan(strategy: str, names: list[str], groups: int) -> dict:
    from lf_jax import embedding as P

    if strategy == "row_wise_all":
        return {n: P.row_wise(("data", "model")) for n in names}
    if strategy == "table_wise_row_wise":
        return {n: P.table_wise_row_wise(i % groups, "model") for i, n in enumerate(names)}
    if strategy == "column_wise":
        return {n: P.column_wise(4) for n in names}
    if strategy == "table_wise":
        return {n: P.table_wise() for n in names}
    if strategy == "data_parallel":
        return {n: P.data_parallel() for n in names}
    raise ValueError(f"unknown strategy {strategy!r}")


def measure(cfg: dict) -> dict:
    """Compiles the step for cfg['devices'] devices and reads XLA's per-device figures."""
    import jax
    import numpy as np

    from lf_jax.distributed.mesh import make_mesh
    from lf_jax.embedding.collection import EmbeddingCollection, SparseBatch
    from lf_jax.embedding.sparse_optim import rowwise_adagrad
    from lf_jax.embedding.spec import FeatureSpec, TableSpec
    from lf_jax.testing import hlo
    from lf_jax.testing.abstract import abstract_state

    n, model = cfg["devices"], cfg["model"]
    mesh = make_mesh({"data": n // model, "model": model})
    num_tables, max_ids = cfg["tables"], cfg["max_ids"]
    if cfg["strategy"] == "table_wise_row_wise" and n // model > num_tables:
        num_tables, max_ids = n // model, num_tables * max_ids // (n // model)
    names = [f"t{i}" for i in range(num_tables)]
    tables = [
        TableSpec(name=t, vocab_size=cfg["vocab"], dim=cfg["dim"], optimizer=rowwise_adagrad(0.05))
        for t in names
    ]
    features = [
        FeatureSpec(name=f"f{i}", table=t, max_ids=max_ids, combiner="sum")
        for i, t in enumerate(names)
    ]
    plan = _plan(cfg["strategy"], names, n // model)
    exchange = cfg.get("exchange", "rows")
    coll = EmbeddingCollection(
        tables, features, plan, mesh, kernel=cfg["kernel"], exchange=exchange
    )
    batch_size = cfg["per_device"] * n
    spec = lambda dtype: jax.ShapeDtypeStruct(  # noqa: E731
        (batch_size, max_ids), dtype, sharding=coll.batch_sharding()
    )
    batch = SparseBatch(
        ids={f.name: spec(np.int32) for f in features},
        weights={f.name: spec(np.float32) for f in features},
    )

    def step(state, batch):
        acts = coll.lookup(state["tables"], batch)
        loss_fn = lambda acts: sum(jax.numpy.sum(a * a) for a in acts.values())  # noqa: E731
        return coll.apply_gradients(state, batch, jax.grad(loss_fn)(acts))

    start = time.process_time()
    compiled = jax.jit(step, donate_argnums=0).lower(abstract_state(coll), batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    received = hlo.collective_bytes(compiled.as_text())
    return {
        **cfg,
        "mesh": dict(mesh.shape),
        "tables_used": num_tables,
        "max_ids_used": max_ids,
        "groups": [g.name for g in coll.groups],
        "gflop": cost.get("flops", 0.0) / 1e9,
        "bytes_accessed": cost.get("bytes accessed", 0.0),
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "collective_bytes": received,
        "collective_total": sum(received.values()),
        "compile_cpu_s": time.process_time() - start,
    }


def run_one(cfg: dict, timeout: float) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={cfg['devices']}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import scaling; "
    code += f"print('RESULT', json.dumps(scaling.measure({cfg!r})))"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timeout after {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {**cfg, "error": done.stderr.strip().splitlines()[-1:] or ["no output"]}


def format_rows(results: list[dict]) -> str:
    head = "strategy              devices  GFLOP/dev  temp/dev   args/dev   collective bytes/dev"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['strategy']:<22}{r['devices']:>7}  error: {r['error']}")
            continue
        kinds = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r["collective_bytes"].items() if v)
        lines.append(
            f"{r['strategy']:<22}{r['devices']:>7}  {r['gflop']:>9.2f}  "
            f"{r['temp_bytes'] / 1e6:>7.0f} MB {r['argument_bytes'] / 1e6:>7.0f} MB  "
            f"{r['collective_total'] / 1e6:.1f} MB ({kinds or 'none'})"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="8,16,32,64,256")
    parser.add_argument("--strategies", default="row_wise_all,table_wise_row_wise")
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--vocab", default="1e6")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-ids", type=int, default=20)
    parser.add_argument("--per-device", type=int, default=512)
    parser.add_argument("--model", type=int, default=8)
    parser.add_argument("--kernel", default="xla", choices=("xla", "auto", "fused"))
    parser.add_argument("--exchange", default="rows", choices=("rows", "bags"))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    results = []
    for strategy in args.strategies.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            cfg = {
                "strategy": strategy,
                "devices": devices,
                "model": min(args.model, devices),
                "tables": args.tables,
                "vocab": int(float(args.vocab)),
                "dim": args.dim,
                "max_ids": args.max_ids,
                "per_device": args.per_device,
                "kernel": args.kernel,
                "exchange": args.exchange,
            }
            results.append(run_one(cfg, args.timeout))
            print(format_rows(results[-1:]).splitlines()[-1], flush=True)
    print(format_rows(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
