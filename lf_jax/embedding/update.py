"""The sparse update on shard_map: row gradients of the entries -> owners -> optimizer.

Each device sums its entries' row gradients (coef x the gradient of the entry's output
column) per distinct row and sends them to the rows' owners, which sum them across
senders (and replicas of the group) and apply the sparse optimizer once per row
(``apply_at_owners``: ``apply_received`` without replicas, exchange.sum_and_apply with
them; work sized to the real entries and distinct rows). A group whose rows and
entries are all on the device updates one piece (table) at a time.

One exchange round serves the step when every owner gets at most C distinct keys from
every device (lf_jax.embedding.buckets: hash dedupe, gradients summed straight into the
[S, C] send layout); otherwise the keys are sorted and sent in as many rounds as skew
needs (lf_jax.embedding.exchange), exact either way.

Shapes: k micro-batches, B local batch, E entries, C output columns, D dim, R rows,
S slots. Update: stored [S, R, D], slot/local/coef [k, B, E], grads [k, B, C, D]
-> new stored and slots (sparse).

Example:
    >>> stored, slots = group_update(mesh, route, stored, slots, *entries, grads, step)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lf_jax.embedding import ordering
from lf_jax.embedding.buckets import Buckets, always_fits, sum_into_layout
from lf_jax.embedding.dedupe import compacted_positions, dense_index_size, leaders
from lf_jax.embedding.exchange import (
    Requests,
    apply_rows,
    chunked_size,
    exchange_blocks,
    next_round,
    sum_and_apply,
)
from lf_jax.embedding.kernels import fused
from lf_jax.embedding.kernels import route as fused_route
from lf_jax.embedding.lookup import GroupRoute, local_layout, shard_layout


def group_update(
    mesh: Mesh,
    route: GroupRoute,
    stored_srd,
    slots: dict,
    slot_kbe,
    local_kbe,
    coef_kbe,
    grad_kbcd,
    step,
    layout: Buckets | None = None,
):
    """Sparse optimizer step on the rows touched by k micro-batches of entries.

    Each device sums its entries' row gradients (coef * grad of the output column) per
    unique row and sends them to the owners, which sum them across senders (and
    replicas of the group) and apply the optimizer once per row. ``layout``: the
    ``lookup.group_layout`` of these entries (k = 1) if already built for the forward.
    """
    group, all_axes = route.group, tuple(mesh.axis_names)
    # mesh axes of size 1 hold no other replica: nothing to gather over them
    replica_axes = tuple(a for a in all_axes if a not in group.axes and mesh.shape[a] > 1)
    local_examples = slot_kbe.shape[0] * slot_kbe.shape[1] // math.prod(mesh.shape.values())
    gather_entries = bool(replica_axes) and route.gathers_entries(local_examples)
    entry_spec = PartitionSpec(None, all_axes)
    slot_specs = {
        name: group.partition_spec(*([None] * (value.ndim - 1))) for name, value in slots.items()
    }

    def shard(stored_1rd, slots, slot_kbe, local_kbe, coef_kbe, grad_kbcd, step, given):
        def flat(x):
            return x.reshape(-1, *x.shape[2:])

        slot_ne, local_ne, coef_ne, grad_ncd = map(flat, (slot_kbe, local_kbe, coef_kbe, grad_kbcd))
        replicas = replica_axes
        if gather_entries:  # every replica sees every entry; no exchange after the dedupe
            slot_ne, local_ne, coef_ne, grad_ncd = (
                jax.lax.all_gather(x, all_axes, axis=0, tiled=True)
                for x in (slot_ne, local_ne, coef_ne, grad_ncd)
            )
            replicas = ()
        if group.num_slots == 1 and not replicas and route.kernel == "fused":
            return _fused_update(
                route, stored_1rd, slots, slot_ne, local_ne, coef_ne, grad_ncd, step
            )
        stored_rd, slots_r = stored_1rd[0], {k: v[0] for k, v in slots.items()}
        if group.num_slots == 1 and not replicas:  # all rows and entries here
            table_rd, slots_r = _update_pieces(
                route, stored_rd, slots_r, slot_ne, local_ne, coef_ne, grad_ncd, step
            )
        else:
            table_rd, slots_r = _push_entries(
                route,
                stored_rd,
                slots_r,
                slot_ne,
                local_ne,
                coef_ne,
                grad_ncd,
                step,
                replicas,
                all_axes,
                None if given is None else local_layout(given),
            )
        return table_rd[None], {k: v[None] for k, v in slots_r.items()}

    table_spec = group.partition_spec(None, None)
    # Replicas of a group apply the same update (their owners all-gather the pushed
    # gradients over the replica axes); the vma checker cannot see that, hence
    # check_vma=False.
    return jax.shard_map(
        shard,
        mesh=mesh,
        out_specs=(table_spec, slot_specs),
        check_vma=False,
        in_specs=(
            table_spec,
            slot_specs,
            entry_spec,
            entry_spec,
            entry_spec,
            entry_spec,
            PartitionSpec(),
            PartitionSpec(all_axes),
        ),
    )(stored_srd, slots, slot_kbe, local_kbe, coef_kbe, grad_kbcd, step, layout)


def _fused_update(
    route: GroupRoute, stored_1rd, slots_1r, slot_ne, local_ne, coef_ne, grad_ncd, step
):
    """The update of a group whose rows and entries are all on this device as one call of
    the C++ kernel (lf_jax.embedding.kernels.fused.update): each piece's entries deduped
    on their own, the optimizer applied in place. The device's [1, R, ...] blocks go to
    the kernel as they are: XLA then aliases the donated buffers (a reshape to [R, ...]
    in between made it copy the table and slots twice)."""
    pieces = route.piece_columns
    cols_pw = np.full((len(pieces), max(cols.size for _, cols in pieces)), -1, np.int32)
    for i, (_, cols) in enumerate(pieces):
        cols_pw[i, : cols.size] = cols
    rows_ne = jnp.where(slot_ne >= 0, local_ne, -1)
    return fused.update(
        stored_1rd,
        slots_1r,
        rows_ne,
        coef_ne,
        route.out_col_e,
        cols_pw,
        grad_ncd,
        step,
        route.group.optimizer,
    )


def _update_pieces(
    route: GroupRoute, table_rd, slots_r, slot_ne, local_ne, coef_ne, grad_ncd, step
):
    """The update of a group whose rows and entries are all on this device: one piece
    (table) per iteration of a ``lax.scan`` (pieces hold disjoint rows, so each dedupes
    only the entries that read it, over its own rows), each through
    ``exchange.sum_and_apply`` (work sized to its real entries and distinct rows, one
    [N, D] scratch buffer carried from piece to piece, N = B x the widest piece's entry
    columns, and the dedupe's dense [rows + 1] index, restored after each piece rather
    than filled for each). The whole group's [N, D] arrays at once were 396 MB at 8 tables x 4096 x
    20 ids, page-faulted afresh every step; unrolled per piece, XLA scheduled every
    piece's zero-filled buffers first. Pieces with fewer entry columns than the widest
    are padded with an empty column (id -1). (``_fused_update`` instead when the
    group's kernel is 'fused'.)"""
    pieces = route.piece_columns
    width = max(cols.size for _, cols in pieces)
    empty = slot_ne.shape[1]  # index of the appended empty column
    cols_pw = np.full((len(pieces), width), empty, np.int32)
    for i, (_, cols) in enumerate(pieces):
        cols_pw[i, : cols.size] = cols
    out_pw = np.append(route.out_col_e, 0)[cols_pw]
    offset_p = np.asarray([piece.row_offset for piece, _ in pieces], np.int32)
    fill = max(piece.rows_per_slot for piece, _ in pieces)
    slot_ne = jnp.pad(slot_ne, ((0, 0), (0, 1)), constant_values=-1)
    local_ne = jnp.pad(local_ne, ((0, 0), (0, 1)))
    coef_ne = jnp.pad(coef_ne, ((0, 0), (0, 1)))
    dim, num_out = grad_ncd.shape[-1], grad_ncd.shape[1]
    grad_cd = grad_ncd.reshape(-1, dim)  # row n * C + c: output column c of example n

    def piece_update(carry, xs):
        cols_w, out_w, offset = xs
        coef_m = coef_ne[:, cols_w].reshape(-1)

        def gradient(e_k, _):  # entry e = n * width + w: coef x output gradient
            source_k = (e_k // width) * num_out + out_w[e_k % width]
            return grad_cd.at[source_k].get(mode="promise_in_bounds") * coef_m[e_k][:, None]

        return sum_and_apply(
            *carry[:2],
            (local_ne[:, cols_w] - offset).reshape(-1),
            (slot_ne[:, cols_w] >= 0).reshape(-1),
            gradient,
            fill,
            offset,
            route.group.optimizer,
            step,
            *carry[2:],
        ), None

    entries = slot_ne.shape[0] * width
    scratch = jnp.zeros((chunked_size(entries), dim), jnp.float32)
    size = dense_index_size(entries, fill)
    index = None if size is None else jnp.full((size,), entries, jnp.int32)
    carry: tuple = (table_rd, slots_r, scratch, index)
    (table_rd, slots_r, *_), _ = jax.lax.scan(piece_update, carry, (cols_pw, out_pw, offset_p))
    return table_rd, slots_r


def _push_entries(
    route: GroupRoute,
    table_rd,
    slots_r,
    slot_ne,
    local_ne,
    coef_ne,
    grad_ncd,
    step,
    replicas,
    all_axes,
    layout: Buckets | None,
):
    """The update of a group whose rows are on other devices (or replicated): rounds of
    [S, C] row gradients summed from the entries and sent to the owners (one round
    from the hash-deduped layout, ``layout`` if given, when it fits, else the sorted
    keys' rounds)."""
    group = route.group
    slot_m, local_m, coef_m = slot_ne.reshape(-1), local_ne.reshape(-1), coef_ne.reshape(-1)
    m, num_slots, rows = slot_m.size, group.num_slots, group.rows
    if layout is None:
        layout = shard_layout(route, slot_m, local_m, all_axes)
    capacity = layout.capacity
    valid_m = slot_m >= 0
    width, num_out = slot_ne.shape[1], grad_ncd.shape[1]
    grad_cd = grad_ncd.reshape(-1, group.dim)  # row n * C + c: output column c of example n
    out_col_e = jnp.asarray(route.out_col_e)

    def gradient(e_k):  # entry e = n * E + w: coef x its output column's gradient
        source_k = (e_k // width) * num_out + out_col_e[e_k % width]
        return grad_cd.at[source_k].get(mode="promise_in_bounds") * coef_m[e_k][:, None]

    def apply_round(asked_sc, place_m, first_sc, table_rd, slots_r):  # asked_sc: at the owner
        shape = (num_slots, capacity, group.dim)
        if route.kernel == "fused":  # the C++ sums (lf_jax.embedding.kernels.route)
            place_ne = jnp.where(valid_m, place_m, num_slots * capacity).reshape(slot_ne.shape)
            grad_scd = fused_route.sum_places(
                place_ne,
                first_sc,
                coef_ne,
                route.out_col_e,
                grad_ncd,
                one_result=ordering.ordered(),
            )
        else:
            grad_scd = sum_into_layout(place_m, valid_m, first_sc, gradient, shape)
        return apply_at_owners(
            asked_sc,
            grad_scd,
            table_rd,
            slots_r,
            group.optimizer,
            step,
            group.axes,
            replicas,
            route.kernel,
        )

    one_round_places = jnp.where(valid_m, layout.entry_m, num_slots * capacity)
    if always_fits(m, rows, capacity):
        return apply_round(layout.asked_sc, one_round_places, layout.first_sc, table_rd, slots_r)
    # Only int arrays go through conds: a cond carrying the table copied it (256 MB).
    requests = jax.lax.cond(
        layout.fits,
        lambda: Requests.empty(m, num_slots, rows),
        lambda: Requests.build(slot_m, local_m, num_slots, rows),
    )

    def one_round(cursor_s):  # the asks the routing already sent
        return layout.asked_sc, one_round_places, layout.first_sc, cursor_s, jnp.int32(0)

    def sorted_round(cursor_s):
        ask_sc, place_m, cursor_s, more = next_round(requests, cursor_s, capacity, all_axes)
        no_firsts_sc = jnp.full(layout.first_sc.shape, m, jnp.int32)  # every entry is added
        return exchange_blocks(ask_sc, group.axes), place_m, no_firsts_sc, cursor_s, more

    def exchange_round(state):
        cursor_s, _, table_rd, slots_r = state
        asked_sc, place_m, first_sc, cursor_s, more = jax.lax.cond(
            layout.fits, one_round, sorted_round, cursor_s
        )
        return cursor_s, more, *apply_round(asked_sc, place_m, first_sc, table_rd, slots_r)

    state = (requests.start_s, jnp.int32(1), table_rd, slots_r)
    return jax.lax.while_loop(lambda s: s[1] > 0, exchange_round, state)[2:]


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
