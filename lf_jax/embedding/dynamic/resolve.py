"""One step's keys -> rows of one dynamic table, inside one shard_map over every device.

On every device, for the keys of the features that read the table:

1. dedupe the keys (hash probe rounds, lf_jax.embedding.dynamic.key_dedupe: no
   multi-operand sort) and bucket them by owner device, ``layout.devices[owner(key)]``
   (lf_jax.embedding.dynamic.layout);
2. one ``all_to_all`` sends each device the keys it owns (key halves and validity in
   one static [S, W + 1, 3] uint32 buffer, written by one scatter), W the expected keys
   per owner plus 5 standard deviations (lf_jax.embedding.exchange's ``capacity_for``);
   the extra row of every block carries the sender's flag "more than W keys for some
   owner", so every device learns from this exchange whether any device overflowed
   (skew), and then all take the other branch of a ``lax.cond``: a second exchange
   through [S, M] buffers, which fit any skew at O(S x M) per device for M local
   entries. Both branches resolve an owner's keys of the step at once, so the result
   does not depend on the branch;
3. each owner resolves the keys of every sender in place (find, admit, insert, evict:
   lf_jax.embedding.dynamic.hash_table, which resolves a key sent by several devices
   once; its priority is the key value, not the entry order), then sends every key's
   slot back (a second ``all_to_all``). Devices outside a table_wise_row_wise group receive no keys;
4. each owner resets the rows and optimizer slots of its inserted keys to their
   initial values (``reset_inserted``, in place: no ``cond`` holds rows, slots or index);
5. a key in slot c of shard j becomes row ``c * shards + j`` of the collection's table,
   an absent key becomes padding (-1).

On a mesh of one device the keys stay where they are: resolve, reset (``one_device``;
no dedupe before the hash table, no owner grouping, no exchange).

Shapes: B batch, L max_ids (the features' ids concatenated), S devices, M = B x L local
entries, C slots per shard, D dim.

Example:
    >>> rows, table, opt_slots, index = resolve_table(
    ...     layout, mesh, table, opt_slots, index, [hi_bl], [lo_bl], [valid_bl], step, True)
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lf_jax.embedding.dedupe import running_count
from lf_jax.embedding.dynamic.hash_table import resolve_shard
from lf_jax.embedding.dynamic.key_dedupe import owner_ranks
from lf_jax.embedding.dynamic.keys import OWNER_SALT, initial_rows, key_hash, salt
from lf_jax.embedding.dynamic.layout import TableLayout
from lf_jax.embedding.exchange import capacity_for
from lf_jax.embedding.kernels.dynamic import owner_ranks_fused, resolve_shard_fused


def new_ranks(new_n):
    """[N] int32: each new key's rank among the new keys of ``new_n`` [N] bool (entry
    order), -1 for the others."""
    return jnp.where(new_n, running_count(new_n) - 1, -1)


def reset_inserted(
    layout: TableLayout, stored, opt_slots, slot_init, new_n, slot_n, hi_n, lo_n, chunk=None
):
    """(stored, opt_slots) with the rows of the keys ``new_n`` [N] inserted at ``slot_n``
    [N] reset to their initial rows (``initial_rows``, a function of the key) and the
    optimizer slots to their initial values. A step inserts few of its keys once the
    table is warm: the new keys are packed by rank (``new_ranks``, computed only when
    some key is new), ``chunk`` at a time (default N // 8), and only those get rows
    computed and written, in a ``while_loop`` of ceil(new keys / chunk) rounds (none when
    no key is new). The table and slots are updated in place: no branch of a ``cond``
    holds them (a cond's result never shares its operand's buffer: XLA would copy)."""
    spec, group, piece = layout.spec, layout.group, layout.piece
    n = new_n.shape[0]
    chunk = max(1, n // 8) if chunk is None else min(chunk, n)
    count = jnp.sum(new_n, dtype=jnp.int32)
    rank_n = jax.lax.cond(
        count > 0, new_ranks, lambda new: jnp.full(new.shape, -1, jnp.int32), new_n
    )

    def reset(carry):
        start, stored, opt_slots = carry
        within_n = rank_n - start
        target = jnp.where((within_n >= 0) & (within_n < chunk), within_n, chunk)
        pick = (
            jnp.full((chunk,), n, jnp.int32)
            .at[target]
            .set(jnp.arange(n, dtype=jnp.int32), mode="drop")
        )
        safe = jnp.minimum(pick, n - 1)
        local = jnp.where(pick < n, piece.row_offset + slot_n[safe], group.rows)
        fresh = initial_rows(spec, hi_n[safe], lo_n[safe])[:, piece.col_start : piece.col_end]
        stored = stored.at[0, local].set(fresh.astype(stored.dtype), mode="drop")
        opt_slots = {
            k: v.at[0, local].set(jnp.asarray(slot_init[k], v.dtype), mode="drop")
            for k, v in opt_slots.items()
        }
        return start + chunk, stored, opt_slots

    _, stored, opt_slots = jax.lax.while_loop(
        lambda c: c[0] < count, reset, (jnp.int32(0), stored, opt_slots)
    )
    return stored, opt_slots


def resolve_table(
    layout: TableLayout,
    mesh,
    stored,
    opt_slots,
    index,
    his,
    los,
    valids,
    step,
    insert,
    kernel: str = "xla",
):
    """(rows per feature [..., B, L_f] int32 (-1: absent), stored table, optimizer slots,
    per-device index) for one step's keys of one dynamic table (see module docstring).

    ``stored``/``opt_slots``: the collection's group arrays holding the table; ``index``:
    the table's per-device hash tables [S, ...]; ``his``/``los``/``valids``: per feature
    [..., B, L_f] key halves and validity. ``kernel``: 'fused' resolves each shard and
    routes the sender's keys with the C++ kernels (lf_jax.embedding.kernels.dynamic),
    'xla' with hash_table / key_dedupe; the same result.
    """
    group, policy = layout.group, layout.policy
    axes = tuple(mesh.axis_names)
    devices = int(np.prod(list(mesh.shape.values())))
    shards = layout.shards
    owner_device = jnp.asarray([*layout.devices, devices], jnp.int32)  # shard j -> device
    widths = [h.shape[-1] for h in his]
    batch_spec = PartitionSpec(*([None] * (his[0].ndim - 2)), axes)
    slot_init = {k: group.optimizer.slot_init(k) for k in opt_slots}
    resolve_keys = resolve_shard_fused if kernel == "fused" else resolve_shard

    def reset(rows, owned, chunk):
        """(stored, opt_slots) ``rows`` with the inserted keys of ``owned`` (slot, new,
        hi, lo) reset (nothing without ``insert``)."""
        if not insert:
            return rows
        slot_o, new_o, hi_o, lo_o = owned
        return reset_inserted(layout, *rows, slot_init, new_o, slot_o, hi_o, lo_o, chunk)

    def one_device(table, rows, hi, lo, valid, step):
        """The only device owns every key: resolve (repeats resolved once, see
        hash_table), reset; no routing, no exchange. (ids [M], index, rows)."""
        slot, new, table = resolve_keys(table, hi, lo, valid, step, policy, insert)
        # new keys reset an eighth of the entries at a time; slot is -1 where invalid
        return slot, table, reset(rows, (slot, new, hi, lo), max(1, hi.shape[0] // 8))

    def routed(table, rows, hi, lo, valid, step):
        """Keys to their owners and back, inserted keys reset at their owners (module
        docstring); returns what one_device does."""
        m = hi.shape[0]
        # one entry per distinct key is sent, at its rank among its owner's keys
        if kernel == "fused":
            owner, leader, send, within, load = owner_ranks_fused(hi, lo, valid, shards, policy)
        else:
            owner = key_hash(jnp, hi, lo, salt(OWNER_SALT, policy.seed)) % shards
            owner = owner.astype(jnp.int32)
            leader, send, within, load = owner_ranks(owner, hi, lo, valid, shards)
        if layout.devices == tuple(range(devices)):  # shard j on device j
            to_device = jnp.where(send, owner, devices)
        else:
            to_device = owner_device[jnp.where(send, owner, shards)]
        # `devices` (entries not sent) is dropped by the scatters

        # hi, lo and validity of the sent keys, one [S, rows, 3] buffer: one scatter and
        # one all_to_all per exchange
        entries = jnp.stack([hi, lo, jnp.ones_like(hi)], axis=-1)

        def sent_buffer(width, rows):
            """[S, rows, 3]: the unique keys at (owner's device, rank within the owner),
            ranks >= width left out."""
            return (
                jnp.zeros((devices, rows, 3), jnp.uint32)
                .at[jnp.where(within < width, to_device, devices), within]
                .set(entries, mode="drop")
            )

        def to_owners(sent):
            return jax.lax.all_to_all(sent, axes, 0, 0, tiled=True)

        def owner_resolve(received, width, table, active=True):
            """Resolves the received keys [S x width, 3] at their owner (none unless
            ``active``). Returns each sent entry's slot at its owner (-1: none), the
            owner's new index and (with ``insert``) its received keys' (slot, new, hi,
            lo) [S x width] each, for the rows' reset after the exchanges."""
            r_hi, r_lo = received[:, 0], received[:, 1]
            r_valid = (received[:, 2] > 0) & active
            # a key sent by several devices is resolved once, in place (hash_table)
            slot_u, new_u, table = resolve_keys(table, r_hi, r_lo, r_valid, step, policy, insert)
            back = jax.lax.all_to_all(slot_u.reshape(devices, width), axes, 0, 0, tiled=True)
            got = back.at[to_device, within].get(mode="fill", fill_value=-1)
            return got, table, (slot_u, new_u, r_hi, r_lo) if insert else ()

        def wide_received():
            return to_owners(sent_buffer(m, m)).reshape(-1, 3)

        width = capacity_for(m, 1 / shards, m)
        # new keys reset an eighth of the [S, width] buffers at a time
        chunk = max(1, devices * min(width, m) // 8)
        if width >= m:
            got, table, owned = owner_resolve(wide_received(), m, table)
            rows = reset(rows, owned, chunk)
        else:
            # the [S, width] buffers, unless some device has more keys for one owner: each
            # sender flags that in an extra row of every block, so after the exchange every
            # device knows whether any did (no separate collective), and all resolve
            # nothing there and take the [S, M] buffers together
            sent = sent_buffer(width, width + 1)
            sent = sent.at[:, width, 0].set((jnp.max(load) > width).astype(jnp.uint32))
            received = to_owners(sent)
            over = jnp.any(received[:, width, 0] > 0)
            got, table, owned = owner_resolve(
                received[:, :width].reshape(-1, 3), width, table, ~over
            )
            rows = reset(rows, owned, chunk)  # nothing new when over

            def wide(carry):
                _, _, table, rows = carry
                got, table, owned = owner_resolve(wide_received(), m, table)
                return jnp.bool_(False), got, table, reset(rows, owned, chunk)

            # the [S, M] exchange runs 0 or 1 times: a while_loop, not a cond, because
            # XLA updates a loop's carry (index, rows) in place; a cond copies them
            _, got, table, rows = jax.lax.while_loop(
                lambda carry: carry[0], wide, (over, got, table, rows)
            )
        got = got[leader]  # each entry reads its key's leader
        return jnp.where(valid & (got >= 0), got * shards + owner, -1), table, rows

    def shard(stored, opt_slots, index, hi, lo, valid, step):
        shape = hi.shape
        hi, lo, valid = hi.reshape(-1), lo.reshape(-1), valid.reshape(-1)
        # the C++ kernel takes the device's [1, ...] blocks as they are (a squeeze would
        # copy the index in and out of every step)
        table = index if kernel == "fused" else {k: v[0] for k, v in index.items()}
        resolve = one_device if devices == 1 else routed
        # inserted keys start from fresh rows and optimizer slots
        ids, table, (stored, opt_slots) = resolve(table, (stored, opt_slots), hi, lo, valid, step)
        if kernel != "fused":
            table = {k: v[None] for k, v in table.items()}
        return ids.reshape(shape), stored, opt_slots, table

    table_spec = group.partition_spec(None, None)
    slot_specs = {k: group.partition_spec(*([None] * (v.ndim - 1))) for k, v in opt_slots.items()}
    index_specs = {k: PartitionSpec(axes, *([None] * (v.ndim - 1))) for k, v in index.items()}
    ids, stored, opt_slots, index = jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(
            table_spec,
            slot_specs,
            index_specs,
            batch_spec,
            batch_spec,
            batch_spec,
            PartitionSpec(),
        ),
        out_specs=(batch_spec, table_spec, slot_specs, index_specs),
        check_vma=False,
    )(
        stored,
        opt_slots,
        index,
        jnp.concatenate(his, axis=-1),
        jnp.concatenate(los, axis=-1),
        jnp.concatenate(valids, axis=-1),
        step,
    )
    parts = np.cumsum([0, *widths])
    rows = [ids[..., a:b] for a, b in zip(parts[:-1], parts[1:], strict=True)]
    return rows, stored, opt_slots, index
