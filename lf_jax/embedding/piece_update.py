"""The sparse update of one table piece whose rows and entries are all on this device.

A key's summed gradient is its first entry's gradient when the key has one entry (most
keys of uniform ids): ``apply_entries`` reads those straight from the entries' output
gradients inside the optimizer loop, and sums only the keys with several entries into a
scratch buffer (one row per such key: at most half the entries). With duplicates (zipf)
the buffer holds most of the work and fewer distinct rows are applied, so the step gets
cheaper; with distinct ids the per-entry scatter into a buffer is skipped.

Used by lf_jax.embedding.update for groups without replicas or other owners; owners of
an exchange sum received rows in place (lf_jax.embedding.exchange.sum_and_apply).

Shapes: M entries, K = CHUNK entries or keys per loop iteration, D dim, R rows.

Example:
    >>> table_rd, slots_r, dup_hd, index = apply_entries(
    ...     table_rd, slots_r, keys_m, valid_m, gradient, fill, offset, optimizer, step,
    ...     jnp.zeros((dup_rows(m), d)), index)
"""

import jax
import jax.numpy as jnp

from lf_jax.embedding.dedupe import first_appearances, running_count
from lf_jax.embedding.exchange import CHUNK, apply_rows, chunked_size


def dup_rows(entries: int) -> int:
    """Rows of ``apply_entries``' scratch for ``entries`` entries: keys with two or more
    entries, at most half the entries (at least one row)."""
    return max(1, entries // 2)


def apply_entries(
    table_rd,
    slots_r: dict,
    keys_m,
    valid_m,
    gradient,
    fill: int,
    offset,
    optimizer,
    step,
    dup_hd,
    index=None,
):
    """Sums the gradients of entries per distinct key and applies ``optimizer`` to the
    rows ``offset + key``, work sized to the real entries and distinct keys.

    keys_m: [M] int32 in [0, fill) where valid_m; gradient(e_k) -> [K, D] float32
    gradients of entries e_k (indices in [0, M)); dup_hd: an [H >= dup_rows(M), D]
    float32 scratch (any contents; returned for reuse); index: the dedupe's dense index
    (dedupe.first_appearances: every entry M; handed back restored) or None.

    Two loops with data-dependent trip counts over chunks of K: (1) the entries of keys
    with several entries, compacted: each gradient goes into its key's scratch row
    (``set`` for the key's first entry, ``add`` for later ones, so no zero fill); (2) the
    distinct keys in order of first appearance: a key's gradient is its scratch row if it
    has several entries, else its only entry's ``gradient``; gather slots, apply the
    optimizer, scatter. Returns (table, slots, dup_hd, index).
    """
    m = keys_m.shape[0]
    chunk = min(CHUNK, m)
    padded, size = chunked_size(m), dup_hd.shape[0]
    num_rows = table_rd.shape[0]
    keys_m = jnp.where(valid_m, keys_m, fill)
    unique_u, inverse_m, is_first_m, index = first_appearances(keys_m, fill, index)
    pos_m = jnp.arange(m, dtype=jnp.int32)
    count = jnp.max(jnp.where(valid_m, inverse_m, -1)) + 1  # keys' places used
    # a key's place u has several entries if any valid entry of it is not its first
    later_m = valid_m & ~is_first_m
    shared_u = jnp.zeros((m,), bool).at[jnp.where(later_m, inverse_m, m)].set(True, mode="drop")
    dup_u = running_count(shared_u) - 1  # the scratch row of a shared key
    first_u = jnp.zeros((m,), jnp.int32).at[jnp.where(is_first_m, inverse_m, m)].set(
        pos_m, mode="drop"
    )
    summed_m = valid_m & shared_u[inverse_m]  # entries whose key needs the scratch
    order_m = jnp.where(summed_m, running_count(summed_m) - 1, padded)
    summed_k = jnp.full((padded,), m, jnp.int32).at[order_m].set(pos_m, mode="drop")
    num_summed = jnp.sum(summed_m, dtype=jnp.int32)

    def add_entries(c, dup_hd):
        e_k = jax.lax.dynamic_slice(summed_k, (c * chunk,), (chunk,))
        ok_k = e_k < m
        e_k = jnp.minimum(e_k, m - 1)
        g_kd = gradient(e_k)
        row_k, first_k = dup_u[inverse_m[e_k]], is_first_m[e_k]
        dup_hd = dup_hd.at[jnp.where(ok_k & first_k, row_k, size)].set(g_kd, mode="drop")
        return dup_hd.at[jnp.where(ok_k & ~first_k, row_k, size)].add(g_kd, mode="drop")

    dup_hd = jax.lax.fori_loop(0, (num_summed + chunk - 1) // chunk, add_entries, dup_hd)

    def apply_chunk(c, state):
        u_k = jnp.minimum(c * chunk + jnp.arange(chunk, dtype=jnp.int32), m - 1)
        key_k = unique_u[u_k]
        live_k = (c * chunk + jnp.arange(chunk, dtype=jnp.int32) < count) & (key_k < fill)
        rows_k = jnp.where(live_k, key_k + offset, num_rows)
        shared_k = shared_u[u_k]
        summed_kd = dup_hd.at[jnp.where(shared_k, dup_u[u_k], 0)].get(mode="clip")
        g_kd = jnp.where(shared_k[:, None], summed_kd, gradient(first_u[u_k]))
        return apply_rows(*state, rows_k, g_kd, optimizer, step)

    table_rd, slots_r = jax.lax.fori_loop(
        0, (count + chunk - 1) // chunk, apply_chunk, (table_rd, slots_r)
    )
    return table_rd, slots_r, dup_hd, index
