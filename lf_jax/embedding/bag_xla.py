"""Bag mode's local work in XLA ops: the path of groups on the 'xla' kernel (GPU, TPU,
or optimizers the fused CPU kernels lack), with the fused kernels' contracts
(lf_jax.embedding.kernels.bag, kernels.route.pool_parts), so
lf_jax.embedding.bag_exchange runs either.

The requester's layout sorts its entries by owner (stable: entry order kept) and
numbers each owner's partial bags in order of first appearance, as the fused kernel
does, in O(M log M) whatever the number of owners; the owner pools by one scatter-add
into its S x [Cb, D] blocks; the requester adds each bag's partials by one scatter-add
over its partial slots; the owner's update sums its entries' gradients per row and
applies the optimizer (exchange.sum_and_apply, work sized to the real entries).

Shapes: N examples x E entry columns (M = N x E), K output columns, S owners, Ce
entries and Cb partial bags per owner, X entries received per sender, R rows, D dim.

Example (inside shard_map):
    >>> packed_sc3, index_nq, bag_of_sc, most = layout(slot_ne, local_ne, coef_ne, out_col_e,
    ...                                               num_slots=S, num_out=K, entries=Ce, bags=Cb)
    >>> parts_scd = pool_to(table_rd, rows_sx, dst_sx, coef_sx, bags=Cb)      # at the owner
    >>> out_nkd = pool_parts(parts_scd, bag_of_sc, num_examples=N, num_out=K)  # back home
"""

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.exchange import chunked_size, sum_and_apply


def layout(slot_ne, local_ne, coef_ne, out_col_e, num_slots, num_out, entries, bags):
    """(packed [S, Ce, 3] int32, index [N, K x S] int32, bag_of [S, Cb] int32, most [2]
    int32) as kernels.bag.layout gives them: per owner its entries in entry order (local
    row, partial slot, coef bits; (-1, -1, 0) past its count), index[n, k x S + s] = s x
    Cb + the (n, k) bag's partial slot at s (-1: none), bag_of[s, j] = n x K + k (N x K
    where empty), most = (most entries, most partial slots) of an owner. Entries past Ce
    or of a bag past Cb are not placed (most says so).

    One stable sort of the entries by owner, O(M log M) whatever S: with non-decreasing
    ``out_col_e`` (a GroupRoute's), each owner's entries of one bag are then adjacent,
    and its partial slots count the bags' first entries."""
    out_col_e = np.asarray(out_col_e, np.int32)
    if np.any(np.diff(out_col_e) < 0):
        raise ValueError(f"bag_xla.layout needs non-decreasing out_col_e, got {out_col_e}")
    n, e = slot_ne.shape
    s_n, k, m = num_slots, num_out, n * e
    slot_m = slot_ne.reshape(-1)
    owner_m = jnp.where(slot_m >= 0, slot_m, s_n).astype(jnp.int32)  # S: padding
    bag_m = (np.arange(n, dtype=np.int32)[:, None] * k + out_col_e[None, :]).reshape(-1)
    order = jnp.argsort(owner_m, stable=True)
    owner_o, bag_o = owner_m[order], jnp.asarray(bag_m)[order]
    start_s = jnp.searchsorted(owner_o, jnp.arange(s_n + 1, dtype=jnp.int32)).astype(jnp.int32)
    pos_o = jnp.arange(m, dtype=jnp.int32)
    rank_o = pos_o - start_s[jnp.minimum(owner_o, s_n)]
    first_o = (rank_o == 0) | (bag_o != jnp.roll(bag_o, 1))  # a bag's first entry at its owner
    firsts_o = jnp.cumsum(first_o, dtype=jnp.int32)  # firsts up to and including o
    before_s = jnp.where(start_s > 0, firsts_o[jnp.maximum(start_s - 1, 0)], 0)
    part_o = firsts_o - 1 - before_s[jnp.minimum(owner_o, s_n)]
    real_o = owner_o < s_n
    placed_o = real_o & (rank_o < entries) & (part_o < bags)
    coef_bits = jax.lax.bitcast_convert_type(coef_ne.reshape(-1).astype(jnp.float32), jnp.int32)
    local_m = local_ne.reshape(-1).astype(jnp.int32)
    values_o3 = jnp.stack([local_m[order], part_o, coef_bits[order]], axis=-1)
    empty = jnp.asarray([-1, -1, 0], jnp.int32)  # no row, no slot, coef 0.0
    packed = jnp.broadcast_to(empty, (s_n, entries, 3))
    packed = packed.at[jnp.where(placed_o, owner_o, s_n), rank_o].set(values_o3, mode="drop")
    new_o = first_o & real_o & (part_o < bags)  # a partial slot in the capacity
    column_o = (bag_o % k) * s_n + jnp.minimum(owner_o, s_n - 1)
    index_nq = jnp.full((n, k * s_n), -1, jnp.int32)
    index_nq = index_nq.at[jnp.where(new_o, bag_o // k, n), column_o].set(
        owner_o * bags + part_o, mode="drop"
    )
    bag_of = jnp.full((s_n, bags), n * k, jnp.int32)
    bag_of = bag_of.at[jnp.where(new_o, owner_o, s_n), part_o].set(bag_o, mode="drop")
    count_s = start_s[1:] - start_s[:-1]
    firsts_s = jnp.where(count_s > 0, firsts_o[jnp.maximum(start_s[1:] - 1, 0)], 0) - before_s[:-1]
    most = jnp.stack([jnp.max(count_s), jnp.max(jnp.where(count_s > 0, firsts_s, 0))])
    return packed, index_nq, bag_of, most.astype(jnp.int32)


def pool_to(table_rd, rows_sx, dst_sx, coef_sx, bags: int) -> jax.Array:
    """[S, Cb, D] float32: sender s's entry adds ``coef * table[row]`` into row dst of
    block s (rows outside [0, R) or dst outside [0, Cb) skipped)."""
    s_n, rows = rows_sx.shape[0], table_rd.shape[0]
    ok_sx = (rows_sx >= 0) & (rows_sx < rows) & (dst_sx >= 0) & (dst_sx < bags)
    rows_x = jnp.where(ok_sx, rows_sx, 0).reshape(-1)
    values_xd = table_rd.at[rows_x].get(mode="promise_in_bounds").astype(jnp.float32)
    values_xd = values_xd * jnp.where(ok_sx, coef_sx, 0.0).reshape(-1, 1)
    target_sx = jnp.arange(s_n, dtype=jnp.int32)[:, None] * bags + dst_sx
    target_x = jnp.where(ok_sx, target_sx, s_n * bags).reshape(-1)
    out = jnp.zeros((s_n * bags, table_rd.shape[-1]), jnp.float32)
    return out.at[target_x].add(values_xd, mode="drop").reshape(s_n, bags, -1)


def pool_parts(parts_scd, bag_of_sc, num_examples: int, num_out: int) -> jax.Array:
    """[N, K, D] float32: each (n, k) bag's partials added up, partial slot j of block s
    into bag ``bag_of[s, j]`` (n x K + k; N x K: empty) by one scatter-add, work sized to
    the S x Cb partials (not to the N x K x S index)."""
    bags, dim = num_examples * num_out, parts_scd.shape[-1]
    out = jnp.zeros((bags, dim), jnp.float32)
    out = out.at[bag_of_sc.reshape(-1)].add(parts_scd.reshape(-1, dim), mode="drop")
    return out.reshape(num_examples, num_out, dim)


def update(table_rd, slots_r, rows_sx, dst_sx, coef_sx, grads_scd, step, optimizer):
    """(table [R, D], slots [R, ...]): entry x of sender s has gradient coef x
    grads[s, dst]; summed per row and ``optimizer`` applied once per row (rows outside
    [0, R) skipped)."""
    rows_sx, dst_sx, coef_sx, grads_scd = map(jnp.asarray, (rows_sx, dst_sx, coef_sx, grads_scd))
    s_n, x_n = rows_sx.shape
    rows, bags = table_rd.shape[0], grads_scd.shape[1]
    ok_x = ((rows_sx >= 0) & (rows_sx < rows) & (dst_sx >= 0) & (dst_sx < bags)).reshape(-1)
    source_x = (jnp.arange(s_n, dtype=jnp.int32)[:, None] * bags + dst_sx).reshape(-1)
    source_x = jnp.where(ok_x, source_x, 0)
    coef_x = coef_sx.reshape(-1)
    grads_kd = grads_scd.reshape(-1, grads_scd.shape[-1])

    def gradient(e_k, _):
        got = grads_kd.at[source_x[e_k]].get(mode="promise_in_bounds")
        return got * coef_x[e_k][:, None]

    scratch = jnp.zeros((chunked_size(s_n * x_n), table_rd.shape[-1]), jnp.float32)
    table_rd, slots_r, *_ = sum_and_apply(
        table_rd,
        slots_r,
        rows_sx.reshape(-1),
        ok_x,
        gradient,
        rows,
        0,
        optimizer,
        step,
        scratch,
    )
    return table_rd, slots_r
