"""The fused CPU kernels of the owner-routed exchange (route.cc) as JAX calls.

Under the collection's ``kernel`` 'fused' (lf_jax.embedding.kernels.fused: 'auto' on
CPU) an exchanging group's local work around its all_to_alls runs in C++: the one-round
layout (``route``: a hash dedupe and owner buckets, lf_jax.embedding.buckets.Buckets),
the owners' gathers of the asked rows (``gather_asked``: exchange.owner_rows) and the
update's row-gradient sums in the send layout (``sum_places``:
buckets.sum_into_layout). The exchanges themselves (all_to_all, pmax) and the sorted
multi-round path that takes a step whose buckets overflow stay XLA collectives and ops
on every kernel. Kernel 'xla' runs the jnp versions named above.

Shapes: M entries (N examples x E entry columns), S owners, C capacity per owner,
D dim, R rows, K output columns.

Example (inside shard_map):
    >>> ask_sc, entry_m, first_sc, count_s = route(slot_m, local_m, S, R, C)
    >>> rows_scd = gather_asked(table_rd, asked_sc)      # at the owner
    >>> grads_scd = sum_places(place_ne, first_sc, coef_ne, out_col_e, grad_nkd)
"""

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.kernels.build import load


def route(slot_m, local_m, num_slots: int, rows: int, capacity: int):
    """(ask_sc [S, C], entry_m [M], first_sc [S, C], count_s [S]) int32: the one-round
    layout of [M] entries (slot < 0: padding), keys in order of first appearance in each
    owner's bucket; ask is ``rows`` and first is M at empty places; entry_m is 0 for
    padding and for keys past a full bucket (count_s > C: the layout does not fit)."""
    load()
    m = slot_m.shape[0]
    shapes = (
        jax.ShapeDtypeStruct((num_slots, capacity), jnp.int32),
        jax.ShapeDtypeStruct((m,), jnp.int32),
        jax.ShapeDtypeStruct((num_slots, capacity), jnp.int32),
        jax.ShapeDtypeStruct((num_slots,), jnp.int32),
    )
    return jax.ffi.ffi_call("lf_jax_route", shapes)(
        slot_m.astype(jnp.int32), local_m.astype(jnp.int32), rows=np.int64(rows)
    )


def _blocks(num_slots: int, capacity: int, dim: int):
    """S result shapes [C, D] float32: one buffer per owner, which XLA:CPU hands to its
    peer of the all_to_all as it is (one [S, C, D] result was copied out in S slices)."""
    return [jax.ShapeDtypeStruct((capacity, dim), jnp.float32)] * num_slots


def gather_asked(table_rd, asked_sc) -> jax.Array:
    """[S, C, D] float32 rows ``table[asked_sc]`` (0 where asked is out of [0, R)) of a
    table [..., R, D] (float32, bfloat16 or float16), one block per asking peer."""
    load()
    num_slots, capacity = asked_sc.shape
    out = jax.ffi.ffi_call("lf_jax_gather_asked", _blocks(num_slots, capacity, table_rd.shape[-1]))(
        table_rd, asked_sc.astype(jnp.int32)
    )
    return jnp.stack(out)


def sum_places(
    place_ne, first_sc, coef_ne, out_col_e: np.ndarray, grad_nkd, one_result: bool = False
) -> jax.Array:
    """[S, C, D] float32: entry (n, e) adds ``coef[n, e] * grad[n, out_col[e]]`` into
    place ``place[n, e]`` of the [S * C] layout (places outside it are skipped). Place p
    is written from entry ``first_sc`` (flat n * E + e; M = N * E or more: none, 0 + the
    sum of its entries) and the other entries are added in entry order, in one pass: a
    first must be its place's earliest entry (``route``'s first appearance), an earlier
    entry of the place is an error when the call runs.

    The kernel writes S results [C, D], one per owner, which the all_to_all takes
    without a copy; ``one_result``: one [S, C, D] result instead (multi-process runs:
    with S results inside the exchange loop, two-process runs whose step came from the
    persistent compilation cache hung, lf_jax.embedding.ordering)."""
    load()
    num_slots, capacity = first_sc.shape
    dim = grad_nkd.shape[-1]
    shape = jax.ShapeDtypeStruct((num_slots, capacity, dim), jnp.float32)
    out = jax.ffi.ffi_call(
        "lf_jax_sum_places", shape if one_result else _blocks(num_slots, capacity, dim)
    )(
        place_ne.astype(jnp.int32),
        first_sc.astype(jnp.int32),
        coef_ne.astype(jnp.float32),
        jnp.asarray(out_col_e, jnp.int32),
        grad_nkd.astype(jnp.float32),
    )
    return out if one_result else jnp.stack(out)


def pool_parts(parts_cd, index_ne, coef_ne, out_col_e: np.ndarray, num_out: int) -> jax.Array:
    """[N, K, D] float32: entry (n, e) adds ``coef[n, e] * rows[index[n, e]]`` into column
    out_col[e], the [S * C, D] rows given as S float32 blocks [C, D] (an exchange's
    per-peer results, passed without concatenating them); index < 0 is padding."""
    load()
    dim = parts_cd[0].shape[-1]
    out = jax.ShapeDtypeStruct((index_ne.shape[0], num_out, dim), jnp.float32)
    return jax.ffi.ffi_call("lf_jax_pool_parts", out)(
        index_ne.astype(jnp.int32),
        coef_ne.astype(jnp.float32),
        jnp.asarray(out_col_e, jnp.int32),
        *parts_cd,
    )
