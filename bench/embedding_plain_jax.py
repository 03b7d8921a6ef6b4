"""The plain-JAX sparse step of ../shared/peers/jax_peers.py (``--impl sparse
--per-table-jit``), rewritten as a bench/embedding.py worker so it runs on the same ids
(bench/embedding.py's ``host_batches``) with process CPU time per step.

Per table: a flat layout of the real ids (capacity: the largest real count of the
batches, rounded up to 1024; padding has weight 0), gather -> pooled by segment_sum ->
gradient w.r.t. the gathered rows -> ``jnp.unique(size=n)`` + segment_sum of duplicate
rows -> row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) scattered into the unique rows,
table and accumulator donated; one jitted step per table, dispatched T times a step.
"""

import numpy as np


def flat_batches(batches: list[dict], num_tables: int) -> tuple[list, int]:
    """[T] tuples (ids [C], bag [C], weight [C]) per batch from [B, L] ids (-1 pad)."""
    counts = [int((b[f"f{t}"] >= 0).sum()) for b in batches for t in range(num_tables)]
    capacity = int(np.ceil(max(counts) / 1024) * 1024)
    out = []
    for b in batches:
        per_table = []
        for t in range(num_tables):
            ids_bl = b[f"f{t}"]
            rows, _ = np.nonzero(ids_bl >= 0)
            real = ids_bl[ids_bl >= 0]
            ids = np.zeros(capacity, np.int32)
            bag = np.full(capacity, ids_bl.shape[0], np.int32)
            weight = np.zeros(capacity, np.float32)
            ids[: real.size], bag[: real.size], weight[: real.size] = real, rows, 1.0
            per_table.append((ids, bag, weight))
        out.append(per_table)
    return out, capacity


def worker_plain_jax(cfg: dict, host_batches, timed_steps, summarize_times, r_d_seed=1):
    import jax
    import jax.numpy as jnp

    batch, dim, vocab, lr = cfg["batch"], cfg["dim"], cfg["vocab"], cfg["learning_rate"]
    flat, capacity = flat_batches(host_batches(cfg), cfg["num_tables"])
    device_batches = [[tuple(map(jnp.asarray, t)) for t in b] for b in flat]
    r_d = jnp.asarray(np.random.default_rng(r_d_seed).normal(size=dim).astype(np.float32))

    def loss_of_rows(rows_cd, bag_c, weight_c):
        pooled_bd = jax.ops.segment_sum(rows_cd * weight_c[:, None], bag_c, num_segments=batch)
        return jnp.mean(jnp.square(pooled_bd @ r_d))

    def table_step(table_vd, acc_v, ids_c, bag_c, weight_c):
        rows_cd = table_vd[ids_c]
        loss, grad_cd = jax.value_and_grad(loss_of_rows)(rows_cd, bag_c, weight_c)
        keys_c = jnp.where(weight_c > 0, ids_c, vocab)
        unique_u, inverse_c = jnp.unique(
            keys_c, size=keys_c.size, fill_value=vocab, return_inverse=True
        )
        grad_ud = jax.ops.segment_sum(grad_cd, inverse_c.reshape(-1), num_segments=keys_c.size)
        acc_v = acc_v.at[unique_u].add(jnp.mean(grad_ud * grad_ud, axis=1), mode="drop")
        acc_u = acc_v.at[unique_u].get(mode="fill", fill_value=1.0)
        step_ud = (lr / (jnp.sqrt(acc_u) + 1e-8))[:, None] * grad_ud
        return table_vd.at[unique_u].add(-step_ud, mode="drop"), acc_v, loss

    jitted = jax.jit(table_step, donate_argnums=(0, 1))
    key = jax.random.key(0)
    tables = [
        jax.random.normal(jax.random.fold_in(key, t), (vocab, dim)) / np.sqrt(dim)
        for t in range(cfg["num_tables"])
    ]
    accs = [jnp.zeros((vocab,), jnp.float32) for _ in range(cfg["num_tables"])]

    def run_step(state, per_table):
        tables, accs = state
        out_tables, out_accs, losses = [], [], []
        for table, acc, inputs in zip(tables, accs, per_table, strict=True):
            table, acc, loss = jitted(table, acc, *inputs)
            out_tables.append(table)
            out_accs.append(acc)
            losses.append(loss)
        return (out_tables, out_accs), sum(losses)

    _, (times, cpu), loss = timed_steps(run_step, (tables, accs), device_batches, cfg)
    return {**summarize_times(times, batch, cpu), "loss": loss, "capacity_per_table": capacity}
