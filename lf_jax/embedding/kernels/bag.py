"""The fused CPU kernels of the exchange's bag mode (bag_step.cc) as JAX calls.

Bag mode (owner-side pooling of partial bags): a requester sends each owner its entries
(local row, partial slot, coefficient; ``layout``), the owner pools them into one
partial sum per (example, output column) bag (``pool_to``) and sends the partials back;
the requester adds them (kernels.route.pool_parts with the layout's index). The update
sends each bag's output gradient to the owners holding part of it; the owner sums its
entries' gradients per row and applies the optimizer (``update``).

Shapes: N examples x E entry columns, K output columns, S owners, Ce entries and Cb
partial slots per owner, X entries received per sender, R rows, D dim.

Example (inside shard_map):
    >>> packed_sc3, index_nq, bag_of_sc, most = layout(slot_ne, local_ne, coef_ne, out_col_e,
    ...                                               num_slots=S, num_out=K, entries=Ce, bags=Cb)
    >>> parts_scd = pool_to(table_rd, rows_sx, dst_sx, coef_sx, bags=Cb)      # at the owner
    >>> table_rd, slots = update(table_rd, slots, rows_sx, dst_sx, coef_sx, grads_scd, step, opt)
"""

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.kernels.build import load
from lf_jax.embedding.kernels.fused import update_call
from lf_jax.embedding.sparse_optim import SparseOptimizer


def layout(
    slot_ne,
    local_ne,
    coef_ne,
    out_col_e: np.ndarray,
    num_slots: int,
    num_out: int,
    entries: int,
    bags: int,
):
    """(packed [S, Ce, 3] int32, index [N, K * S] int32, bag_of [S, Cb] int32, most [2]
    int32) of a requester's [N, E] entries (slot < 0: padding): per owner s its entries
    (local row, partial slot, coef bits; row -1 where empty), partial slots in order of
    first appearance, index[n, k * S + s] = s * Cb + slot (-1: none), bag_of[s, j] =
    n * K + k (N * K where empty), most = (most entries, most partial slots) of an owner:
    above (Ce, Cb) the layout does not hold every entry."""
    load()
    n = slot_ne.shape[0]
    shapes = (
        jax.ShapeDtypeStruct((num_slots, entries, 3), jnp.int32),
        jax.ShapeDtypeStruct((n, num_out * num_slots), jnp.int32),
        jax.ShapeDtypeStruct((num_slots, bags), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    return jax.ffi.ffi_call("lf_jax_bag_layout", shapes)(
        slot_ne.astype(jnp.int32),
        local_ne.astype(jnp.int32),
        coef_ne.astype(jnp.float32),
        jnp.asarray(out_col_e, jnp.int32),
    )


def unpack(packed_sc3):
    """(rows, dst int32, coef float32) [S, X] of received packed entries."""
    return (
        packed_sc3[..., 0],
        packed_sc3[..., 1],
        jax.lax.bitcast_convert_type(packed_sc3[..., 2], jnp.float32),
    )


def pool_to(table_rd, rows_sx, dst_sx, coef_sx, bags: int) -> jax.Array:
    """[S, Cb, D] float32: sender s's entry i adds ``coef * table[row]`` into row dst of
    block s (rows outside [0, R) or dst outside [0, Cb) skipped); one result per sender,
    which the all_to_all takes as it is."""
    load()
    num_slots, dim = rows_sx.shape[0], table_rd.shape[-1]
    out = jax.ffi.ffi_call(
        "lf_jax_pool_to", [jax.ShapeDtypeStruct((bags, dim), jnp.float32)] * num_slots
    )(table_rd, rows_sx.astype(jnp.int32), dst_sx.astype(jnp.int32), coef_sx.astype(jnp.float32))
    return jnp.stack(out)


def update(
    table_rd, slots_r: dict, rows_sx, dst_sx, coef_sx, grads_scd, step, optimizer: SparseOptimizer
):
    """``optimizer`` applied in place once per distinct row of the received entries, with
    the sum of their gradients ``coef * grads[s, dst]`` (in entry order); ``grads_scd``: the
    [S, Cb, D] bag gradients, or the S received blocks [Cb, D]. Table and slots are
    aliased to the outputs (donate them). Returns (table, slots)."""
    load()
    operands = (
        rows_sx.astype(jnp.int32),
        dst_sx.astype(jnp.int32),
        coef_sx.astype(jnp.float32),
        jnp.asarray(step, jnp.int32),
        *(b.astype(jnp.float32) for b in grads_scd),
    )
    return update_call(optimizer, table_rd, slots_r, operands, family="bag_")
