"""The owners' side of the sparse update: received row gradients -> optimizer.

An exchanging group's owners receive [S, C] row gradients per round (one block per
sender), sum them per row across senders (and the group's replicas) and apply the
sparse optimizer once per row: the fused C++ update (each received row a one-entry
example), ``apply_received`` without replicas, exchange.sum_and_apply with them.

Shapes: S senders, C places per sender, K = S x C received rows, D dim, R rows.

Example (inside shard_map, at the owner):
    >>> table_rd, slots_r = apply_at_owners(asked_sc, grad_scd, table_rd, slots_r, opt,
    ...                                     step, axes=("data",), replica_axes=())
"""

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.dedupe import compacted_positions, leaders
from lf_jax.embedding.exchange import apply_rows, exchange_blocks, sum_and_apply
from lf_jax.embedding.kernels import fused


def apply_at_owners(
    row_sc, grad_scd, table_rd, slots_r: dict, optimizer, step, axes, replica_axes, kernel="xla"
):
    """One round's [S, C] row gradients go to their owners (all_to_all over ``axes``,
    then gathered over ``replica_axes``, with ``row_sc``: the rows they are for, already
    at the owner, row s from sender s, ``rows`` = table rows for empty places); each
    owner sums them per row across senders and applies ``optimizer`` once per row
    (``kernel`` 'fused': one call of the C++ update, each received row an entry of its
    own). Returns (table, slots)."""
    rows = table_rd.shape[0]
    if axes:
        grad_scd = exchange_blocks(grad_scd, axes)
    if replica_axes:
        row_sc = jax.lax.all_gather(row_sc, replica_axes, axis=0, tiled=True)
        grad_scd = jax.lax.all_gather(grad_scd, replica_axes, axis=0, tiled=True)
    row_k = row_sc.reshape(-1)
    if kernel == "fused":  # the kernel sums each row's entries and applies it once
        # each sender's block as it came from the all_to_all (no concatenation copy)
        grad_parts = [g_cd[:, None, :] for g_cd in grad_scd] if axes and not replica_axes else None
        if grad_parts is None:
            grad_parts = [grad_scd.reshape(row_k.size, 1, -1)]
        return _fused_apply_received(table_rd, slots_r, row_k, grad_parts, optimizer, step)
    grad_kd = grad_scd.reshape(row_k.size, -1)
    if axes and not replica_axes:  # S senders: add duplicates into one place, apply all
        return apply_received(table_rd, slots_r, row_k, grad_kd, optimizer, step)
    if replica_axes:  # every replica's senders: sum per row in place, in chunks
        table_rd, slots_r, *_ = sum_and_apply(
            table_rd,
            slots_r,
            row_k,
            row_k < rows,
            lambda e_k, sums_kd: sums_kd.at[e_k].get(mode="promise_in_bounds"),
            rows,
            0,
            optimizer,
            step,
            grad_kd,
        )
        return table_rd, slots_r
    # this device's own unique keys: already one gradient per row
    return apply_rows(table_rd, slots_r, row_k, grad_kd, optimizer, step)


def _fused_apply_received(table_rd, slots_r: dict, row_k, grad_parts, optimizer, step):
    """The owner's update by the C++ kernel: the [K] received rows (``rows`` = table rows
    for empty places, skipped) are entries of K one-entry examples with coefficient 1 and
    output gradient row k of ``grad_parts`` (equal blocks [K / blocks, 1, D], in order);
    the kernel sums each distinct row's and applies ``optimizer`` in place.
    Returns (table, slots)."""
    one = np.zeros((1, 1), np.int32)
    return fused.update(
        table_rd,
        slots_r,
        row_k[:, None],
        jnp.ones((row_k.size, 1), jnp.float32),
        one[0],
        one,
        grad_parts,
        step,
        optimizer,
    )


DUP_CHUNK = 1024  # duplicate rows per iteration of apply_received's loop


def apply_received(table_rd, slots_r: dict, row_k, grad_kd, optimizer, step):
    """The owner's update from the [K] rows (``rows`` = table rows for empty places) and
    [K, D] gradients its S senders sent (K = S x C): each row's gradients are added into
    one of its places (its ``leaders`` entry) and ``optimizer`` is applied at those
    places, all K at once (the others are padding to ``apply_rows``). No compaction:
    senders send distinct rows, so duplicates are few (one per extra sender of a row);
    they are added DUP_CHUNK at a time, work sized to their count. (One scatter-add of
    the whole [K, D] buffer into itself cost XLA:CPU two extra copies of it.)
    Returns (table, slots)."""
    rows, size = table_rd.shape[0], row_k.shape[0]
    valid_k = row_k < rows
    pos_k = jnp.arange(size, dtype=jnp.int32)
    leader_k = leaders(jnp.where(valid_k, row_k, rows))
    dup_k = valid_k & (leader_k != pos_k)
    chunk = min(DUP_CHUNK, size)
    dups_k = compacted_positions(dup_k, chunk)

    def add_dups(c, grad_kd):  # duplicates are never leaders: their rows stay unchanged
        from_k = jax.lax.dynamic_slice(dups_k, (c * chunk,), (chunk,))
        to_k = jnp.where(
            from_k < size,
            leader_k.at[jnp.minimum(from_k, size - 1)].get(mode="promise_in_bounds"),
            size,
        )
        return grad_kd.at[to_k].add(grad_kd.at[from_k].get(mode="clip"), mode="drop")

    num_dups = jnp.sum(dup_k, dtype=jnp.int32)
    grad_kd = jax.lax.fori_loop(0, (num_dups + chunk - 1) // chunk, add_dups, grad_kd)
    row_k = jnp.where(valid_k & ~dup_k, row_k, rows)
    return apply_rows(table_rd, slots_r, row_k, grad_kd, optimizer, step)
