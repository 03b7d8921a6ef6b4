"""Owner-routed exchange in sorted rounds: exact under any skew.

lf_jax.embedding.buckets serves a step in one round when every bucket fits the capacity
(the common case); this module is the general path it falls back to, and holds the
pieces both share (``sum_and_apply``; the owners' side: lf_jax.embedding.owner_update).

Inside shard_map, a device holds M local entries (slot, local row) of one shard group.
It dedupes them (one sort of packed ``slot * rows + local`` keys), which also buckets
them by owner slot, and then runs exchange *rounds*: in each round it sends at most
``capacity`` keys to every owner through one ``all_to_all`` over the group's mesh axes;
the owner gathers (forward) or updates (backward) the rows and, for the forward, sends
them back through a second ``all_to_all``. Per-device work and bytes are
O(M + S * capacity), with ``capacity`` ~ the expected keys per owner, never O(global
batch).

Exact under any skew: nothing is dropped or truncated. A round's keys for owner s are
all keys below a bound, the minimum over every device of its (capacity+1)-th pending
key for s, so no device sends more than ``capacity`` keys to s and the rounds cover
disjoint row ranges at each owner (every row's gradient arrives in one round, and the
sparse optimizer applies it once). With uniform ids there is one round; when every id
lands on one owner, about M / capacity rounds (a ``while_loop`` that runs until no
device has a pending key).

Shapes: M local entries, U = M unique slots (padded), S owners (devices along the
group's axes), C capacity per owner and round, D dim.

Example (inside shard_map):
    >>> requests = Requests.build(slot_m, local_m, num_slots=S, rows=R)
    >>> rows_ud = fetch_rows(requests, table_rd, axes=("data", "model"), capacity=C,
    ...                      all_axes=("data", "model"))
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lf_jax.embedding.dedupe import compacted_positions, first_appearances, unique_with_inverse
from lf_jax.errors import UserInputError

INT32_LIMIT = 2**31 - 1


def check_key_range(group_name: str, num_slots: int, rows: int) -> None:
    """Packed keys slot * rows + local must fit int32; a clear error otherwise."""
    if num_slots * (rows + 1) > INT32_LIMIT:
        raise UserInputError(
            f"shard group '{group_name}': {num_slots} slots x {rows} rows per slot exceed "
            f"the int32 key range of the exchange ({INT32_LIMIT}); split its tables over "
            "more groups (e.g. another dim or optimizer) or shard rows over fewer devices"
        )


def capacity_for(entries: int, share: float, rows: int) -> int:
    """Keys per owner and round: the expected count plus 5 standard deviations.

    ``share`` is the largest fraction of a device's entries one owner is expected to
    receive (1 / S for rows spread evenly). Five sigma of a binomial count keeps a
    second round rare at 256 devices x 256 owners; skew costs rounds, never ids. Never
    more than the entries, nor than the ``rows`` an owner holds (its distinct keys).
    """
    mean = share * entries
    return int(min(entries, rows, math.ceil(mean + 5 * math.sqrt(mean) + 1)))


def replicas_gather_entries(entries: int, columns: int, dim: int, rows: int) -> bool:
    """Whether a replicated group (one slot, several replicas) syncs its replicas by
    all-gathering every device's entries and output gradients (12 bytes per id + one
    float32 D-vector per output column) rather than its unique rows' gradients (4 + 4 D
    bytes per distinct id, at most ``rows``): the fewer bytes wins. Long bags favour the
    entries; short bags over small tables favour the rows. ``entries`` and ``columns``
    are one device's counts."""
    entry_bytes = entries * 12 + columns * dim * 4
    row_bytes = min(entries, rows) * (4 + dim * 4)
    return entry_bytes < row_bytes


def unique_size(entries: int, num_slots: int, rows: int) -> int:
    """Static count of a device's distinct keys: at most every row of the group + fill."""
    return min(entries, num_slots * rows + 1)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["unique_u", "inverse_m", "row_u", "start_s", "end_s"],
    meta_fields=["rows"],
)
@dataclasses.dataclass(frozen=True)
class Requests:
    """A device's deduplicated keys, sorted (so bucketed by owner), with bucket bounds.

    unique_u: [U] packed keys (fill = num_slots * rows), U = unique_size(M, S, rows);
    inverse_m: [M] entry -> unique;
    row_u: [U] local row at the owner (``rows`` for fill); start_s / end_s: [S] bucket
    bounds in unique_u.
    """

    unique_u: jax.Array
    inverse_m: jax.Array
    row_u: jax.Array
    start_s: jax.Array
    end_s: jax.Array
    rows: int

    @classmethod
    def build(cls, slot_m: jax.Array, local_m: jax.Array, num_slots: int, rows: int):
        """Entries with slot < 0 (padding, or owned by no device here) are ignored."""
        fill = num_slots * rows
        keys_m = jnp.where(slot_m >= 0, slot_m * rows + local_m, fill)
        unique_u, inverse_m = unique_with_inverse(keys_m, fill)
        # written by a scatter: XLA fused the binary search behind inverse_m into each
        # pooled-column gather of the sorted rounds' pool, and cost_analysis counted the
        # whole [M] search per column (0.28 GFLOP at 256 devices, table_wise_row_wise)
        pos_m = jnp.arange(keys_m.size, dtype=jnp.int32)
        inverse_m = jnp.zeros_like(inverse_m).at[pos_m].set(inverse_m, unique_indices=True)
        unique_u = unique_u[: unique_size(keys_m.size, num_slots, rows)]
        bounds = jnp.searchsorted(
            unique_u, jnp.arange(num_slots + 1, dtype=unique_u.dtype) * rows, method="scan_unrolled"
        ).astype(jnp.int32)
        row_u = jnp.where(unique_u < fill, unique_u % rows, rows)
        return cls(unique_u, inverse_m, row_u, bounds[:-1], bounds[1:], rows)

    @classmethod
    def empty(cls, entries: int, num_slots: int, rows: int):
        """Requests of the same shapes as ``build``'s with no keys (a cond's other branch)."""
        size = unique_size(entries, num_slots, rows)
        none_s = jnp.zeros((num_slots,), jnp.int32)
        return cls(
            jnp.full((size,), num_slots * rows, jnp.int32),
            jnp.zeros((entries,), jnp.int32),
            jnp.full((size,), rows, jnp.int32),
            none_s,
            none_s,
            rows,
        )

    @property
    def num_slots(self) -> int:
        return self.start_s.shape[0]


def _round_requests(req: Requests, cursor_s, capacity: int, all_axes):
    """This round's [S, C] positions into unique_u and their validity (a prefix per owner).

    An owner's keys go in ascending order; the round takes those below the bound, the
    smallest (capacity+1)-th pending key any device has for that owner.
    """
    size = req.row_u.shape[0]
    ahead_s = cursor_s + capacity
    proposal_s = jnp.where(
        ahead_s < req.end_s, _take(req.row_u, jnp.minimum(ahead_s, size - 1)), req.rows
    )
    bound_s = jax.lax.pmin(proposal_s, all_axes) if all_axes else proposal_s
    pos_sc = cursor_s[:, None] + jnp.arange(capacity, dtype=jnp.int32)[None, :]
    safe_sc = jnp.minimum(pos_sc, size - 1)
    valid_sc = (pos_sc < req.end_s[:, None]) & (_take(req.row_u, safe_sc) < bound_s[:, None])
    return safe_sc, valid_sc


def _take(x, index):
    """x[index] along axis 0 for indices known to be in range (no bounds masking)."""
    return x.at[index].get(mode="promise_in_bounds")


def masked_rows(table_rd, ask) -> jax.Array:
    """float32 rows ``table_rd[ask]``, 0 where ``ask`` is out of range (empty places).

    The gather is multiplied by a 0/1 mask so that XLA:CPU fuses it into an elementwise
    loop: its plain gather kernel copied the rows 2-3x slower (54,408 rows of 1e6 x 64:
    15.6 vs 5.2 CPU ms, bench/BENCHMARKS.md "8 vs 1 device")."""
    keep = (ask < table_rd.shape[0]).astype(jnp.float32)[..., None]
    return table_rd.at[ask].get(mode="clip").astype(jnp.float32) * keep


def owner_rows(table_rd, ask_sc) -> jax.Array:
    """[S, C, D] float32 ``masked_rows`` of the [S, C] rows an owner was asked for, one
    gather per asking peer, stacked: XLA:CPU splits an all_to_all's operand into one
    buffer per peer and then writes each gather straight into its peer's buffer. One
    [S, C, D] gather instead was materialised and then copied into the S buffers by S
    slice fusions (24 MB of temp per device at 64 devices), and XLA's cost_analysis
    counted each slice fusion's whole [S, C, D] mask multiply, S times over."""
    return jnp.stack([masked_rows(table_rd, ask_c) for ask_c in ask_sc])


def _asked_rows(req: Requests, safe_sc, valid_sc) -> jax.Array:
    """[S, C] local rows to ask each owner for (``rows`` where empty), written by a
    scatter into a fresh buffer: XLA fuses an elementwise producer of an all_to_all's
    operand into each peer's slice of it, and its cost_analysis then counts the whole
    [S, C] producer once per peer (S^2 C flops: 0.13 GFLOP per device at 256 devices)."""
    size = valid_sc.size
    place_sc = jnp.where(valid_sc, jnp.arange(size, dtype=jnp.int32).reshape(valid_sc.shape), size)
    ask_k = jnp.full((size,), req.rows, jnp.int32)
    ask_k = ask_k.at[place_sc].set(_take(req.row_u, safe_sc), mode="drop")
    return ask_k.reshape(valid_sc.shape)


def exchange_blocks(x, axes):
    """Block s of x's leading axis goes to device s of ``axes`` (all_to_all); x if none."""
    return jax.lax.all_to_all(x, axes, 0, 0, tiled=True) if axes else x


def _run_rounds(req: Requests, capacity: int, all_axes, body, carry):
    """Runs ``body(safe_sc, valid_sc, carry) -> carry`` until no device has pending keys.

    One round without a loop when there is a single owner and capacity covers every
    distinct key it can be asked for.
    """
    if req.num_slots == 1 and capacity >= min(req.row_u.shape[0], req.rows):
        safe_sc, valid_sc = _round_requests(req, req.start_s, capacity, ())
        return body(safe_sc, valid_sc, carry)

    def pending(cursor_s):
        more = jnp.any(cursor_s < req.end_s).astype(jnp.int32)
        return jax.lax.pmax(more, all_axes) if all_axes else more

    def step(state):
        cursor_s, _, carry = state
        safe_sc, valid_sc = _round_requests(req, cursor_s, capacity, all_axes)
        carry = body(safe_sc, valid_sc, carry)
        cursor_s = cursor_s + jnp.sum(valid_sc, axis=1, dtype=jnp.int32)
        return cursor_s, pending(cursor_s), carry

    state = (req.start_s, pending(req.start_s), carry)
    return jax.lax.while_loop(lambda s: s[1] > 0, step, state)[2]


def next_round(req: Requests, cursor_s, capacity: int, all_axes):
    """The next round of ``req`` from owner cursors ``cursor_s`` [S]: (ask_sc [S, C] local
    rows to ask, ``rows`` where empty, written by a scatter for the all_to_all (see
    ``_asked_rows``); place_m [M] each entry's place in the [S * C] layout, S * C for
    entries of other rounds; the advanced cursors; whether any device still has pending
    keys, the same on every device)."""
    safe_sc, valid_sc = _round_requests(req, cursor_s, capacity, all_axes)
    ask_sc = _asked_rows(req, safe_sc, valid_sc)
    size = valid_sc.size
    place_u = (
        jnp.full(req.row_u.shape, size, jnp.int32)
        .at[jnp.where(valid_sc, safe_sc, req.row_u.shape[0])]
        .set(jnp.arange(size, dtype=jnp.int32).reshape(valid_sc.shape), mode="drop")
    )
    cursor_s = cursor_s + jnp.sum(valid_sc, axis=1, dtype=jnp.int32)
    more = jnp.any(cursor_s < req.end_s).astype(jnp.int32)
    more = jax.lax.pmax(more, all_axes) if all_axes else more
    return ask_sc, _take(place_u, req.inverse_m), cursor_s, more


def fetch_rows(req: Requests, table_rd, axes, capacity: int, all_axes) -> jax.Array:
    """[U, D] float32 rows of the unique keys, gathered from their owners (0 for fill)."""
    size = req.row_u.shape[0]

    def body(safe_sc, valid_sc, rows_ud):
        if axes:
            ask_sc = exchange_blocks(_asked_rows(req, safe_sc, valid_sc), axes)
        else:
            ask_sc = jnp.where(valid_sc, _take(req.row_u, safe_sc), req.rows)
        got_scd = owner_rows(table_rd, ask_sc)
        if axes:
            got_scd = exchange_blocks(got_scd, axes)
        where_sc = jnp.where(valid_sc, safe_sc, size)
        return rows_ud.at[where_sc].set(got_scd, mode="drop")

    init = jnp.zeros((size, table_rd.shape[-1]), jnp.float32)
    return _run_rounds(req, capacity, all_axes, body, init)


CHUNK = 8192  # entries or distinct rows per iteration of sum_and_apply's loops


def chunked_size(entries: int) -> int:
    """Rows of the gradient buffer sum_and_apply needs for ``entries`` entries."""
    chunk = min(CHUNK, entries)
    return -(-entries // chunk) * chunk


def sum_and_apply(
    table_rd,
    slots_r: dict,
    keys_m,
    valid_m,
    gradient,
    fill: int,
    offset,
    optimizer,
    step,
    grad_kd,
    index=None,
):
    """Sums the gradients of entries per distinct key and applies ``optimizer`` to the
    rows ``offset + key``, with work sized to the real entries and distinct keys.

    keys_m: [M] int32 in [0, fill) where valid_m; gradient(e_k, grad_kd) -> [CHUNK, D]
    float32 gradients of entries e_k (indices in [0, M)); grad_kd: an [N >= M, D] float32
    buffer (any contents; returned for reuse); index: the dedupe's dense index
    (dedupe.first_appearances: every entry M; handed back restored, for reuse) or None.
    Two loops with data-dependent trip counts
    over chunks of CHUNK: (1) the valid entries, compacted: each gradient is written into
    its distinct key's row of grad_kd (``set`` for the key's first entry, ``add`` for
    later duplicates, so no zero fill); (2) the distinct keys: gather rows and slots,
    apply the optimizer, scatter. Padding costs no row work and duplicates make it
    cheaper. A key's row is at most its first entry's position and chunks go in
    position order, so ``gradient`` may read entry e's gradient from row e of the
    grad_kd it is given: the owner of an exchange sums its received rows in place.
    Returns (table, slots, grad_kd, index).
    """
    m = keys_m.shape[0]
    chunk = min(CHUNK, m)
    size = grad_kd.shape[0]
    num_rows = table_rd.shape[0]
    keys_m = jnp.where(valid_m, keys_m, fill)
    unique_u, inverse_m, is_first_m, index = first_appearances(keys_m, fill, index)
    count = jnp.max(jnp.where(valid_m, inverse_m, -1)) + 1  # distinct keys' rows used
    real_k = compacted_positions(valid_m, chunk)
    num_real = jnp.sum(valid_m, dtype=jnp.int32)

    def add_entries(c, grad_kd):
        e_k = jax.lax.dynamic_slice(real_k, (c * chunk,), (chunk,))
        ok_k = e_k < m
        e_k = jnp.minimum(e_k, m - 1)
        g_kd = gradient(e_k, grad_kd)
        u_k, first_k = inverse_m[e_k], is_first_m[e_k]
        grad_kd = grad_kd.at[jnp.where(ok_k & first_k, u_k, size)].set(g_kd, mode="drop")
        return grad_kd.at[jnp.where(ok_k & ~first_k, u_k, size)].add(g_kd, mode="drop")

    grad_kd = jax.lax.fori_loop(0, (num_real + chunk - 1) // chunk, add_entries, grad_kd)

    def apply_chunk(c, state):
        u_k = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        key_k = unique_u[jnp.minimum(u_k, m - 1)]
        rows_k = jnp.where((u_k < count) & (key_k < fill), key_k + offset, num_rows)
        if size % chunk == 0:
            g_kd = jax.lax.dynamic_slice_in_dim(grad_kd, c * chunk, chunk)
        else:  # a slice would be clamped at the end: gather the rows
            g_kd = _take(grad_kd, jnp.minimum(u_k, size - 1))
        return apply_rows(*state, rows_k, g_kd, optimizer, step)

    table_rd, slots_r = jax.lax.fori_loop(
        0, (count + chunk - 1) // chunk, apply_chunk, (table_rd, slots_r)
    )
    return table_rd, slots_r, grad_kd, index


def apply_rows(table_rd, slots_r: dict, row_k, grad_kd, optimizer, step):
    """``optimizer`` applied to the rows ``row_k`` (distinct; ``rows`` and above are
    padding, neither read nor written) with their summed gradients [K, D]: the rows get
    the optimizer's delta by one scatter-add (float32 tables: the old rows are never
    gathered) or, for bfloat16 / float16 tables, old row + delta rounded once and set."""
    old_slots = {k: v.at[row_k].get(mode="fill", fill_value=0) for k, v in slots_r.items()}
    delta_kd, new_slots = optimizer.delta(grad_kd, old_slots, step)
    if table_rd.dtype == jnp.float32:
        table_rd = table_rd.at[row_k].add(delta_kd, mode="drop")
    else:
        old_kd = table_rd.at[row_k].get(mode="fill", fill_value=0).astype(jnp.float32)
        table_rd = table_rd.at[row_k].set((old_kd + delta_kd).astype(table_rd.dtype), mode="drop")
    slots_r = {k: v.at[row_k].set(new_slots[k], mode="drop") for k, v in slots_r.items()}
    return table_rd, slots_r
