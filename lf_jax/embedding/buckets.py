"""One-round exchange layout: a hash dedupe and owner buckets without a sort of the keys.

Inside shard_map a device holds M entries (owner slot, local row) of one shard group.
When every owner gets at most ``capacity`` distinct keys from every device (uniform or
zipf ids), one exchange round serves the whole step, and the keys need not be sorted by
row within an owner (lf_jax.embedding.exchange sorts them so that several rounds cover
disjoint row ranges). This module builds that round's layout:

- a hash dedupe (``leaders``): every entry finds one entry with the same key, its
  leader, through a table of 4 M int32 slots, in as many probe rounds as collisions
  need (3-4 at M = 81,920; each resolves at least one key, so it always ends);
- owner buckets: the leaders' packed ``slot << bits | position`` keys sorted (one
  one-operand sort of M small ints), so bucket s lists the distinct keys owner s serves;
- ``entry_m``: each entry's row in the [S * C] send/receive layout, so the forward pools
  straight from the received rows and the update sums row gradients straight into it.

``fits`` (the same on every device) says whether one round suffices; when it does not,
the caller takes the sorted, multi-round path of lf_jax.embedding.exchange, which is
exact under any skew. Per-device work: O(M + S * C).

Shapes: M local entries, S owners, C capacity per owner, D dim.

Example (inside shard_map):
    >>> layout = Buckets.build(slot_m, local_m, num_slots=S, rows=R, capacity=C,
    ...                        all_axes=("data",))
    >>> rows_scd = jax.lax.all_to_all(table_rd[layout.asked_sc], ...)  # when layout.fits
    >>> pooled = rows_scd.reshape(S * C, D)[layout.entry_m]
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lf_jax.embedding.dedupe import compacted_positions, leaders, position_bits, running_count
from lf_jax.embedding.exchange import CHUNK, exchange_blocks, owner_rows
from lf_jax.embedding.kernels import route as fused_route
from lf_jax.errors import UserInputError

STACKED_SUMS = 16  # owners up to which sum_into_layout keeps one buffer per owner
LATER_CHUNK = 1024  # entries per iteration of sum_into_layout's loop over non-first entries

INT32_MAX = 2**31 - 1


def check_packed_range(group_name: str, entries: int, num_slots: int) -> None:
    """Packed ``slot << bits | position`` keys must fit int32 below the sentinel; a clear
    error otherwise (raised while tracing, before any device work)."""
    if num_slots << position_bits(entries) >= INT32_MAX:
        raise UserInputError(
            f"shard group '{group_name}': {entries} entries per device x {num_slots} owner "
            "slots exceed the int32 keys of the exchange layout; use a smaller per-device "
            "batch or shard rows over fewer devices"
        )


def always_fits(entries: int, rows: int, capacity: int) -> bool:
    """Whether ``capacity`` covers every distinct key an owner can get (at most the
    entries, and at most its rows): one round always, known while tracing."""
    return capacity >= min(entries, rows)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["ask_sc", "entry_m", "fits", "most", "asked_sc", "first_sc"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Buckets:
    """The one-round layout of a device's entries (see module docstring).

    ask_sc: [S, C] local rows to ask owner s for (``rows`` where the bucket is shorter);
    entry_m: [M] each valid entry's row in the [S * C] layout (0 for padding);
    fits: scalar bool, the same on every device of ``all_axes``: every bucket of every
    device holds at most C keys;
    most: scalar int32, the same on every device: the most distinct keys any device has
    for one owner (what C must be for one round; lf_jax.embedding.capacity sizes C
    from it);
    asked_sc: [S, C] the owner's side: row s lists the local rows device s asks this
    device for (``ask_sc`` sent through one all_to_all over the group's axes), for the
    forward's gathers and the update's sums alike: one exchange of the asks per step;
    first_sc: [S, C] the position of the entry that leads each place (M where empty):
    ``sum_into_layout`` writes the places from their leaders and adds only the rest.
    """

    ask_sc: jax.Array
    entry_m: jax.Array
    fits: jax.Array
    most: jax.Array
    asked_sc: jax.Array
    first_sc: jax.Array

    @property
    def capacity(self) -> int:
        """C, the static capacity per owner this layout was built for."""
        return self.ask_sc.shape[-1]

    @classmethod
    def build(
        cls,
        slot_m,
        local_m,
        num_slots: int,
        rows: int,
        capacity: int,
        all_axes,
        axes=(),
        real: int | None = None,
        kernel: str = "xla",
    ):
        """Entries with slot < 0 (padding) are ignored. ``axes``: the group's mesh axes,
        over which ``asked_sc`` is exchanged (none: the asks stay here). ``real``: at
        most this many entries hold ids (None: M), e.g. M x the collection's id_fill:
        the valid entries are compacted into [real] first, so the dedupe and the bucket
        sort skip the padding; a device with more valid entries makes ``fits`` false
        (the sorted rounds, exact, take the step). ``kernel`` 'fused': the layout comes
        from the C++ kernel (lf_jax.embedding.kernels.route.route: one hash pass over the
        entries, padding skipped, so ``real`` does not apply); 'xla': the jnp path below."""
        m = slot_m.shape[0]
        if kernel == "fused":
            ask_sc, entry_m, first_sc, count_s = fused_route.route(
                slot_m, local_m, num_slots, rows, capacity
            )
            over = jnp.int32(0)
        elif real is None or real >= m:
            ask_sc, entry_m, count_s, first_sc = _buckets(
                slot_m, local_m, num_slots, rows, capacity
            )
            over = jnp.int32(0)
        else:
            valid_m = slot_m >= 0
            rank_m = running_count(valid_m) - 1
            kept_m = valid_m & (rank_m < real)
            pos_m = jnp.arange(m, dtype=jnp.int32)
            src_k = (
                jnp.full((real,), m, jnp.int32)
                .at[jnp.where(kept_m, rank_m, real)]
                .set(pos_m, mode="drop")
            )
            safe_k = jnp.minimum(src_k, m - 1)
            slot_k = jnp.where(src_k < m, slot_m.at[safe_k].get(mode="promise_in_bounds"), -1)
            local_k = local_m.at[safe_k].get(mode="promise_in_bounds")
            ask_sc, entry_k, count_s, first_sc = _buckets(
                slot_k, local_k, num_slots, rows, capacity
            )
            entry_m = jnp.where(
                kept_m, entry_k.at[jnp.clip(rank_m, 0, real - 1)].get(mode="promise_in_bounds"), 0
            )
            first_sc = jnp.where(
                first_sc < real, src_k.at[jnp.minimum(first_sc, real - 1)].get(mode="clip"), m
            )
            over = (rank_m[-1] >= real).astype(jnp.int32)
        most_over = jnp.stack([jnp.max(count_s), over])
        if all_axes:
            most_over = jax.lax.pmax(most_over, all_axes)
        most = most_over[0]
        fits = most_over[1] == 0
        if not always_fits(
            m if real is None or kernel == "fused" else min(real, m), rows, capacity
        ):
            fits = fits & (most <= capacity)
        return cls(ask_sc, entry_m, fits, most, exchange_blocks(ask_sc, axes), first_sc)


def _buckets(slot_m, local_m, num_slots: int, rows: int, capacity: int):
    """(ask_sc, entry_m, count_s, first_sc) of ``Buckets.build`` for [M] entries: hash
    leaders, then the leaders' packed ``slot << bits | position`` keys sorted."""
    m = slot_m.shape[0]
    bits = position_bits(m)
    valid_m = slot_m >= 0
    pos_m = jnp.arange(m, dtype=jnp.int32)
    leader_m = leaders(jnp.where(valid_m, slot_m * rows + local_m, num_slots * rows))
    is_leader = valid_m & (leader_m == pos_m)
    sorted_p = jnp.sort(jnp.where(is_leader, (slot_m << bits) | pos_m, INT32_MAX))
    count_s = (
        jnp.zeros((num_slots,), jnp.int32)
        .at[jnp.where(is_leader, slot_m, num_slots)]
        .add(1, mode="drop")
    )
    start_s = jnp.cumsum(count_s) - count_s
    pos_sc = start_s[:, None] + jnp.arange(capacity, dtype=jnp.int32)[None, :]
    has_sc = jnp.arange(capacity, dtype=jnp.int32)[None, :] < count_s[:, None]
    leader_sc = sorted_p.at[jnp.minimum(pos_sc, m - 1)].get(mode="promise_in_bounds")
    leader_sc = leader_sc & ((1 << bits) - 1)
    # each leader's place in the layout: owner * C + rank within its bucket
    size = num_slots * capacity
    place_sc = jnp.arange(size, dtype=jnp.int32).reshape(num_slots, capacity)
    # written by a scatter into a fresh buffer, not a select: XLA fused a select into
    # each peer's slice of the asks' all_to_all, and cost_analysis counted the whole
    # [S, C] select once per peer (see exchange._asked_rows)
    ask_sc = (
        jnp.full((size,), rows, jnp.int32)
        .at[jnp.where(has_sc, place_sc, size)]
        .set(local_m.at[leader_sc].get(mode="clip"), mode="drop")
        .reshape(num_slots, capacity)
    )
    place_m = (
        jnp.zeros((m,), jnp.int32).at[jnp.where(has_sc, leader_sc, m)].set(place_sc, mode="drop")
    )
    entry_m = jnp.where(valid_m, place_m.at[leader_m].get(mode="promise_in_bounds"), 0)
    return ask_sc, entry_m, count_s, jnp.where(has_sc, leader_sc, m)


def fetch_one_round(layout: Buckets, table_rd, axes, kernel: str = "xla") -> jax.Array:
    """[S, C, D] float32: the rows of ``layout.ask_sc`` from their owners, in layout
    order (entry m reads row ``layout.entry_m[m]`` of the [S * C, D] rows; empty places
    are 0): the owner gathers ``layout.asked_sc`` (``kernel`` 'fused': the C++ gather,
    else XLA's) and sends them back over ``axes``. Only valid when ``layout.fits``."""
    if kernel == "fused":
        rows_scd = fused_route.gather_asked(table_rd, layout.asked_sc)
    else:
        rows_scd = owner_rows(table_rd, layout.asked_sc)
    return exchange_blocks(rows_scd, axes)


def sum_into_layout(place_m, valid_m, first_sc, gradient, shape: tuple[int, int, int]) -> jax.Array:
    """[S, C, D] float32: each valid entry's gradient summed into its place (row of the
    [S * C] layout; places >= S * C are dropped).

    gradient(e_k) -> [K, D] float32 gradients of entries e_k. first_sc: [S, C] the
    entry leading each place (``Buckets.first_sc``, M for an empty place), or None.
    Each owner's [C, D] block is written once from its places' first entries (a gather,
    0 where empty: no zero fill of S x C x D floats before the sums), and the other
    valid entries (duplicates of a place's key; every entry when first_sc is None, then
    on zeros) are compacted and added LATER_CHUNK (CHUNK without firsts) at a time, work
    sized to their count, one scatter per owner and chunk: XLA:CPU then hands each
    owner's block to its peer of the all_to_all without copying it out of one
    [S * C, D] buffer. Up to STACKED_SUMS owners; above, one [S * C, D] buffer.
    """
    owners, capacity, dim = shape
    size = owners * capacity
    m = valid_m.shape[0]
    later_m = valid_m & (place_m < size)
    if first_sc is not None:
        first_k = first_sc.reshape(-1)
        at_place_m = first_k.at[jnp.minimum(place_m, size - 1)].get(mode="promise_in_bounds")
        later_m = later_m & (at_place_m != jnp.arange(m, dtype=jnp.int32))
    chunk = min(CHUNK if first_sc is None else LATER_CHUNK, m)
    later_k = compacted_positions(later_m, chunk)
    stacked = owners <= STACKED_SUMS

    def firsts(first_c, rows: int):
        if first_c is None:
            return jnp.zeros((rows, dim), jnp.float32)
        has_c = (first_c < m).astype(jnp.float32)[:, None]
        return gradient(jnp.minimum(first_c, m - 1)) * has_c

    def add_chunk(c, sums):
        e_k = jax.lax.dynamic_slice(later_k, (c * chunk,), (chunk,))
        ok_k = e_k < m
        e_k = jnp.minimum(e_k, m - 1)
        place_k = jnp.where(ok_k, place_m.at[e_k].get(mode="promise_in_bounds"), size)
        grad_kd = gradient(e_k)
        if not stacked:
            return sums.at[place_k].add(grad_kd, mode="drop")
        owner_k, row_k = place_k // capacity, place_k % capacity
        return tuple(
            sums_cd.at[jnp.where(owner_k == s, row_k, capacity)].add(grad_kd, mode="drop")
            for s, sums_cd in enumerate(sums)
        )

    trips = (jnp.sum(later_m, dtype=jnp.int32) + chunk - 1) // chunk
    if not stacked:
        init = firsts(None if first_sc is None else first_sc.reshape(-1), size)
        return jax.lax.fori_loop(0, trips, add_chunk, init).reshape(shape)
    first_sums = tuple(
        firsts(None if first_sc is None else first_sc[s], capacity) for s in range(owners)
    )
    return jnp.stack(jax.lax.fori_loop(0, trips, add_chunk, first_sums))
