"""Deduplication of a device's int32 keys with static sizes: work O(M) per call.

``leaders`` (a hash dedupe in probe rounds, no sort over the key space) and
``unique_with_inverse`` (distinct keys and each entry's index among them). Unordered,
the distinct keys come in order of first appearance, so a key's index is at most its
first entry's position: lf_jax.embedding.exchange.sum_and_apply relies on that to sum
an owner's received gradients in place. Small key spaces use a dense index; larger ones
the hash leaders (never a binary search).

Shapes: M entries.

Example:
    >>> unique_u, inverse_m = unique_with_inverse(jnp.array([7, 3, 7, 9]), fill=10,
    ...                                           ordered=False)
    >>> unique_u, inverse_m  # [7, 3, 9, 10], [0, 1, 0, 2]
"""

import jax
import jax.numpy as jnp


def running_count(x_m: jax.Array) -> jax.Array:
    """[M] int32 inclusive prefix sums of ``x_m`` (bool or int32): ``jnp.cumsum(x_m,
    dtype=int32)`` by ``lax.associative_scan``. XLA:CPU lowers ``jnp.cumsum`` to a
    reduce-window, ~3x slower (81,920 entries: 0.84 vs 0.28 CPU ms; 655,360: 6.6 vs 2.0
    on this 2-core CPU); integer sums are exact either way.

    Example:
        >>> running_count(jnp.array([True, False, True]))  # [1, 1, 2]
    """
    return jax.lax.associative_scan(jnp.add, x_m.astype(jnp.int32))


def compacted_positions(mask_m: jax.Array, chunk: int) -> jax.Array:
    """[P] int32 positions of the True entries of ``mask_m`` [M], in order, then M
    (padding), P = M rounded up to a multiple of ``chunk``: loops that take ``chunk``
    positions per iteration visit only the selected entries, in ceil(count / chunk)
    iterations.

    Example:
        >>> compacted_positions(jnp.array([False, True, True]), 2)  # [1, 2, 3, 3]
    """
    m = mask_m.shape[0]
    padded = -(-m // chunk) * chunk
    order_m = jnp.where(mask_m, running_count(mask_m) - 1, padded)
    pos_m = jnp.arange(m, dtype=jnp.int32)
    return jnp.full((padded,), m, jnp.int32).at[order_m].set(pos_m, mode="drop")


def position_bits(entries: int) -> int:
    """Bits of an entry position (0 .. entries - 1)."""
    return max(1, (entries - 1).bit_length())


def _mix(keys_m: jax.Array, salt: jax.Array, bits: int) -> jax.Array:
    """A ``bits``-bit hash of int32 keys, different for every ``salt`` (murmur3's
    finalizer over the key xor a salt-dependent constant)."""
    x = keys_m.astype(jnp.uint32) ^ (salt.astype(jnp.uint32) * jnp.uint32(0x9E3779B9))
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    return (x >> (32 - bits)).astype(jnp.int32)


def probe_leaders(slot_of, same_key, leader_m: jax.Array) -> jax.Array:
    """[M] int32: for each pending entry (``leader_m < 0``), the position of one entry with
    the same key (the same one for every entry of that key); resolved entries keep theirs.

    Each probe round hashes the pending entries' keys into a table of >= 4 M slots
    (``slot_of(salt, bits)`` -> [M] int32 in [0, 2**bits), different for every uint32
    ``salt``) and writes their positions there (one writer per slot survives); an entry
    whose slot holds a position with its own key (``same_key(found_m)`` -> [M] bool) has
    found its leader. All entries of a key hash alike, so they resolve together, and
    every probed slot resolves its winner's key: the loop ends after at most as many
    rounds as distinct keys, in practice 3-4, also when distinct keys share a hash.
    ``leaders`` (int32 keys) and dynamic/key_dedupe.key_leaders (64-bit keys) use it.
    """
    m = leader_m.shape[0]
    bits = min(position_bits(m) + 2, 30)
    pos_m = jnp.arange(m, dtype=jnp.int32)

    def probe(state):
        salt, table, leader_m = state
        pending_m = leader_m < 0
        slot_m = slot_of(salt, bits)
        table = table.at[jnp.where(pending_m, slot_m, 1 << bits)].set(pos_m, mode="drop")
        found_m = table.at[slot_m].get(mode="promise_in_bounds")
        return (
            salt + jnp.uint32(1),
            table,
            jnp.where(pending_m & same_key(found_m), found_m, leader_m),
        )

    state = (jnp.uint32(0), jnp.zeros((1 << bits,), jnp.int32), leader_m)
    return jax.lax.while_loop(lambda s: jnp.any(s[2] < 0), probe, state)[2]


def leaders(keys_m: jax.Array) -> jax.Array:
    """[M] int32: for each entry, the position of one entry with the same int32 key (the
    same one for every entry of that key), by ``probe_leaders``.

    Example:
        >>> leaders(jnp.array([7, 3, 7, 7]))  # e.g. [3, 1, 3, 3]
    """
    return probe_leaders(
        lambda salt, bits: _mix(keys_m, salt, bits),
        lambda found_m: keys_m.at[found_m].get(mode="promise_in_bounds") == keys_m,
        jnp.full(keys_m.shape, -1, jnp.int32),
    )


DENSE_KEYS_PER_ENTRY = 16


def dense_index_size(entries: int, fill: int) -> int | None:
    """Length of the dense int32 index ``first_appearances`` uses for ``entries`` keys in
    [0, fill] (fill + 1), or None when the key space is too large for one (hash leaders)."""
    return fill + 1 if fill + 1 <= DENSE_KEYS_PER_ENTRY * entries else None


def first_appearances(
    keys_m: jax.Array, fill: int, index: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """(unique_u [M], inverse_m [M], is_first_m [M] bool, index): the distinct keys in
    order of first appearance padded with ``fill``, each entry's index among them,
    whether the entry is its key's first, and the dense index handed back.

    Keys lie in [0, fill]; no sort: a dense int32 index of ``dense_index_size(M, fill)``
    entries when there is one, the hash ``leaders`` otherwise. The dense index may be
    passed in (every entry M, e.g. the one a previous call handed back: it is restored
    to M at the keys it touched, cheaper than filling fill + 1 entries again); else
    one is filled here. ``unique_with_inverse(ordered=False)`` is the first two outputs.

    Example:
        >>> first_appearances(jnp.array([7, 3, 7, 9]), fill=10)[:3]
        ([7, 3, 9, 10], [0, 1, 0, 2], [True, True, False, True])
    """
    m = keys_m.size
    pos_m = jnp.arange(m, dtype=jnp.int32)
    size = dense_index_size(m, fill)
    if size is not None:
        if index is None:
            index = jnp.full((size,), m, jnp.int32)
        index = index.at[keys_m].min(pos_m)
        first_m = index[keys_m]
        # restored to m (first_m <= m); computed from first_m, so the gather above runs
        # first and XLA updates the index in place instead of copying it
        index = index.at[keys_m].set(jnp.maximum(first_m, m))
    else:  # each key's first entry, found through its leader
        leader_m = leaders(keys_m)
        first_m = jnp.full((m,), m, jnp.int32).at[leader_m].min(pos_m)[leader_m]
    is_first = first_m == pos_m
    rank_m = running_count(is_first) - 1
    target = jnp.where(is_first & (keys_m < fill), rank_m, m)
    unique_u = jnp.full_like(keys_m, fill).at[target].set(keys_m, mode="drop")
    return unique_u, rank_m[first_m], is_first, index


def unique_with_inverse(
    keys_m: jax.Array, fill: int, ordered: bool = True
) -> tuple[jax.Array, jax.Array]:
    """jnp.unique(keys_m, size=M, fill_value=fill, return_inverse=True), faster on CPU.

    Keys lie in [0, fill]. Distinct keys come first, padded with ``fill`` (larger than
    every key). With ``ordered=False`` no sort runs: the distinct keys come in order of
    first appearance (a key's index is at most its first entry's position), found
    through a dense [fill + 1] int32 index when the key space is small (fill + 1 <= 16 M:
    one scatter-min, two gathers and a cumsum, 27 ms for 655,360 keys in [0, 1e6) on
    this 2-core CPU) and through the hash ``leaders`` otherwise (the sort of the keys
    and binary search this had taken there gave sorted indices, which broke the
    in-place owner sum of exchange.sum_and_apply). Ordered, one one-operand sort comes
    first (75 ms dense; XLA's key+payload sort is ~6x slower than a one-operand sort on
    CPU); a larger key space then finds each key's index by binary search (330 ms).
    """
    m = keys_m.size
    dense = fill + 1 <= DENSE_KEYS_PER_ENTRY * m
    if not ordered:
        return first_appearances(keys_m, fill)[:2]
    sorted_m = jnp.sort(keys_m)
    is_new = jnp.concatenate([jnp.ones((1,), bool), sorted_m[1:] != sorted_m[:-1]])
    rank_m = running_count(is_new) - 1
    target = jnp.where(is_new, rank_m, m)
    unique_u = jnp.full_like(keys_m, fill).at[target].set(sorted_m, mode="drop")
    if dense:  # the fill key (largest) maps to its own first slot, as searchsorted gives
        where_u = jnp.where(unique_u < fill, unique_u, fill + 1)
        position = (
            jnp.zeros((fill + 1,), jnp.int32)
            .at[where_u]
            .set(jnp.arange(m, dtype=jnp.int32), mode="drop")
        )
        return unique_u, position.at[fill].set(rank_m[-1])[keys_m]
    inverse_m = jnp.searchsorted(unique_u, keys_m, method="scan_unrolled")
    return unique_u, inverse_m.astype(jnp.int32)
