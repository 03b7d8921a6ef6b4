"""The sparse update on shard_map: row gradients of the entries -> owners -> optimizer.

Each device sums its entries' row gradients (coef x the gradient of the entry's output
column) per distinct row and sends them to the rows' owners, which sum them across
senders (and replicas of the group) and apply the sparse optimizer once per row
(lf_jax.embedding.owner_update; work sized to the real entries and distinct rows). A
group whose rows and entries are all on the device updates one piece (table) at a time.
In bag mode (lf_jax.embedding.bag_exchange) the owners get each bag's output gradient
and the entries instead.

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

from lf_jax.embedding import bag_exchange, ordering
from lf_jax.embedding.bag_exchange import BagLayout
from lf_jax.embedding.buckets import Buckets, always_fits, sum_into_layout
from lf_jax.embedding.dedupe import dense_index_size
from lf_jax.embedding.exchange import (
    Requests,
    chunked_size,
    exchange_blocks,
    next_round,
    sum_and_apply,
)
from lf_jax.embedding.kernels import fused
from lf_jax.embedding.kernels import route as fused_route
from lf_jax.embedding.lookup import GroupRoute, local_layout, shard_layout
from lf_jax.embedding.owner_update import apply_at_owners


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
    layout: Buckets | BagLayout | None = None,
):
    """Sparse optimizer step on the rows touched by k micro-batches of entries.

    Each device sums its entries' row gradients (coef * grad of the output column) per
    unique row and sends them to the owners, which sum them across senders (and
    replicas of the group) and apply the optimizer once per row. ``layout``: the
    ``lookup.group_layout`` of these entries (k = 1) if already built for the forward.
    """
    group, all_axes = route.group, tuple(mesh.axis_names)
    # mesh axes of size 1 hold no other replica: nothing to gather over them
    replica_axes = group.replica_axes(mesh)
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
        if bag_exchange.takes_bags(route, given):  # owners pooled partial bags (no replicas)
            # the table stays [1, R, D] through bag_exchange.update's 0-or-1-trip loop:
            # taking [0] before it made XLA copy the table and its slots every step
            entries = (slot_ne, local_ne, coef_ne, grad_ncd, step)

            def rows_exchange(table_1rd, slots_1r):  # when the entries overflow (Ce, Cb)
                slots_r = {k: v[0] for k, v in slots_1r.items()}
                table_rd, slots_r = _push_entries(
                    route, table_1rd[0], slots_r, *entries, (), all_axes, None
                )
                return table_rd[None], {k: v[None] for k, v in slots_r.items()}

            layout = None if given is None else bag_exchange.local(given)
            return bag_exchange.update(route, stored_1rd, slots, *entries, rows_exchange, layout)
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
