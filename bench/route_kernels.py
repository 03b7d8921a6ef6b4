"""Per-call CPU time of the fused exchange's kernels (lf_jax/embedding/kernels/route.cc and
the owners' update in sparse_step.cc) on one device's share of bench/step_scale_ab.py's
8-device step, each kernel jitted alone; optionally saves every kernel's outputs for a
bit-for-bit comparison of two trees (their kernel sources differ: one process each).

Inputs (numpy, fixed seed): 8 tables x 1e6 x 64, global batch 4096 of bags of 1-20 ids
(uniform or zipf(1.1), bench/embedding.py's make_bags), row_wise over S = 8 owners: row r
of a table on owner r % 8. Device d holds examples [512 d, 512 (d + 1)): N = 512, E = 160
entry columns, K = 8 outputs. C = the largest owner count of the 8 devices, rounded up to
a multiple of 8. Kernels timed: ``route`` (device 0's layout), ``gather`` (owner 0's rows
for the 8 devices' asks, table [1e6, 64] float32), ``sum_places`` (device 0's gradients
into its send blocks), ``pool_parts`` (device 0's bags from 8 received blocks),
``update`` (owner 0's row-wise Adagrad over the 8 x C received rows, donated table).
The table and accumulator are backed by huge pages, as EmbeddingCollection.init does.

Usage: python bench/route_kernels.py {uniform,zipf} CALLS [--save OUT.npz]
Prints ``kernel: median / min CPU ms per call`` (process CPU time, all threads), the
mean user-time ms and page faults per call.

Example:
    PYTHONPATH=. python bench/route_kernels.py zipf 50 --save /tmp/zipf_branch.npz
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from embedding import make_bags  # noqa: E402

from lf_jax.embedding.huge_pages import back_with_huge_pages  # noqa: E402
from lf_jax.embedding.kernels import fused  # noqa: E402
from lf_jax.embedding.kernels import route as kr  # noqa: E402
from lf_jax.embedding.sparse_optim import rowwise_adagrad  # noqa: E402

S, TABLES, VOCAB, DIM, BATCH, MAX_IDS = 8, 8, 1_000_000, 64, 4096, 20
ROWS = TABLES * VOCAB // S  # a device's rows of the stacked group


def entries(dist: str):
    """slot, local [8 devices, N, E] int32 and coef [8, N, E] float32."""
    rng = np.random.default_rng(0)
    ids = np.concatenate([make_bags(rng, BATCH, MAX_IDS, VOCAB, dist) for _ in range(TABLES)], 1)
    offset = np.repeat(np.arange(TABLES) * (VOCAB // S), MAX_IDS)[None, :]
    valid = ids >= 0
    slot = np.where(valid, ids % S, -1).astype(np.int32)
    local = (offset + np.maximum(ids, 0) // S).astype(np.int32)
    coef = np.where(valid, rng.uniform(0.5, 1.5, ids.shape), 0).astype(np.float32)
    shape = (S, BATCH // S, TABLES * MAX_IDS)
    return slot.reshape(shape), local.reshape(shape), coef.reshape(shape)


def timed(fn, calls: int) -> tuple[float, float, float, float]:
    """Median and min process CPU ms per call of fn() (blocks on its result), and the
    mean user ms and page faults per call."""
    jax.block_until_ready(fn())
    cpu = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        start = time.process_time()
        jax.block_until_ready(fn())
        cpu.append((time.process_time() - start) * 1e3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) * 1e3 / calls
    faults = (after.ru_minflt - before.ru_minflt) / calls
    return float(np.median(cpu)), float(min(cpu)), user, faults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dist", choices=("uniform", "zipf"))
    ap.add_argument("calls", type=int)
    ap.add_argument("--save")
    args = ap.parse_args()
    slot, local, coef = entries(args.dist)
    n, e = slot.shape[1:]
    counts = []
    for d in range(S):  # every device's distinct keys per owner
        keys = np.unique(slot[d] * ROWS + local[d])
        keys = keys[keys >= 0]
        counts.append(np.bincount(keys // ROWS, minlength=S))
    cap = int(-(-np.max(counts) // 8) * 8)
    route = jax.jit(lambda s, lo: kr.route(s.reshape(-1), lo.reshape(-1), S, ROWS, cap))
    layouts = [[np.asarray(x) for x in route(slot[d], local[d])] for d in range(S)]
    ask0, entry0, first0, _ = layouts[0]
    asked_sc = np.stack([lay[0][0] for lay in layouts])  # owner 0's asks from each device
    rng = np.random.default_rng(1)
    out_col = tuple(int(c) for c in np.arange(e) // MAX_IDS)
    grad = rng.standard_normal((n, TABLES, DIM)).astype(np.float32)
    place = np.where(slot[0] >= 0, entry0.reshape(n, e), S * cap).astype(np.int32)
    index = np.where(slot[0] >= 0, entry0.reshape(n, e), -1).astype(np.int32)
    blocks = [rng.standard_normal((cap, DIM)).astype(np.float32) for _ in range(S)]
    table = jnp.asarray(rng.standard_normal((ROWS, DIM)).astype(np.float32))
    slots = {"accumulator": jnp.zeros((ROWS,), jnp.float32)}
    back_with_huge_pages((table, slots))  # as EmbeddingCollection.init does
    opt = rowwise_adagrad(0.05)
    one, cols = np.zeros(1, np.int32), np.zeros((1, 1), np.int32)
    rows_k1 = jnp.asarray(asked_sc.reshape(-1, 1))
    ones_k1 = jnp.ones(rows_k1.shape, jnp.float32)
    grad_parts = [jnp.asarray(b[:, None, :]) for b in blocks]

    def update(table, slots):
        return fused.update(table, slots, rows_k1, ones_k1, one, cols, grad_parts, 1, opt)

    sum_places = jax.jit(kr.sum_places, static_argnums=3)
    pool_parts = jax.jit(kr.pool_parts, static_argnums=(3, 4))
    gather = jax.jit(kr.gather_asked)
    update_jit = jax.jit(update, donate_argnums=(0, 1))
    args_sp = (jnp.asarray(place), jnp.asarray(first0), jnp.asarray(coef[0]), out_col, grad)
    args_pp = ([jnp.asarray(b) for b in blocks], jnp.asarray(index), jnp.asarray(coef[0]))
    slot_d, local_d, asked_j = jnp.asarray(slot[0]), jnp.asarray(local[0]), jnp.asarray(asked_sc)
    outs = {
        "route": [np.asarray(x) for x in route(slot_d, local_d)],
        "gather": np.asarray(gather(table, asked_j)),
        "sum_places": np.asarray(sum_places(*args_sp)),
        "pool_parts": np.asarray(pool_parts(*args_pp, out_col, TABLES)),
    }
    state: dict = {"t": table, "s": slots}
    touched = np.unique(asked_sc[asked_sc < ROWS])
    state["t"], state["s"] = update_jit(state["t"], state["s"])
    outs["update_rows"] = np.asarray(state["t"][touched])
    outs["update_acc"] = np.asarray(state["s"]["accumulator"][touched])
    print(
        f"{args.dist}: C={cap}, valid entries {int((slot[0] >= 0).sum())}, distinct asks of "
        f"device 0 {int((ask0 < ROWS).sum())}, owner 0 received {int((asked_sc < ROWS).sum())}"
    )

    def step_update():
        state["t"], state["s"] = update_jit(state["t"], state["s"])
        return state["t"]

    runs = {
        "route": lambda: route(slot_d, local_d),
        "gather": lambda: gather(state["t"], asked_j),
        "sum_places": lambda: sum_places(*args_sp),
        "pool_parts": lambda: pool_parts(*args_pp, out_col, TABLES),
        "update": step_update,
    }
    for name, fn in runs.items():
        med, low, user, faults = timed(fn, args.calls)
        print(
            f"{args.dist} {name}: CPU ms per call median {med:.3f} min {low:.3f}; user ms "
            f"{user:.3f}, page faults {faults:.0f} per call",
            flush=True,
        )
    if args.save:
        flat = {}
        for k, v in outs.items():
            for i, x in enumerate(v if isinstance(v, list) else [v]):
                flat[f"{k}_{i}"] = x
        np.savez(args.save, **flat)


if __name__ == "__main__":
    main()
