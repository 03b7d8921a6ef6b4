"""The one-round exchange layout: hash dedupe and owner buckets against numpy.

Every valid entry must land on a place of its owner's bucket that asks for its own row,
entries of one key share one place, every distinct key is asked once, and ``fits`` is
true exactly when no bucket holds more than the capacity (then the caller may skip the
sorted, multi-round exchange).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding.buckets import Buckets, check_packed_range
from lf_jax.embedding.dedupe import leaders
from lf_jax.errors import UserInputError


@pytest.mark.parametrize("distinct", [1, 7, 5000, 40000])
def test_leaders_pick_one_entry_per_key(distinct):
    rng = np.random.default_rng(distinct)
    keys = rng.choice(rng.integers(0, 2**31 - 2, size=distinct), size=40000).astype(np.int32)
    leader = np.asarray(jax.jit(leaders)(jnp.asarray(keys)))
    np.testing.assert_array_equal(keys[leader], keys)  # a leader holds the entry's key
    for key in np.unique(keys)[:200]:  # one leader per key
        assert np.unique(leader[keys == key]).size == 1


def _layout(slot, local, num_slots, rows, capacity):
    def build(slot_m, local_m):
        layout = Buckets.build(slot_m, local_m, num_slots, rows, capacity, ())
        return layout.ask_sc, layout.entry_m, layout.fits

    return [np.asarray(x) for x in jax.jit(build)(jnp.asarray(slot), jnp.asarray(local))]


@pytest.mark.parametrize("skewed", [False, True])
def test_buckets_place_every_entry_on_its_owner_and_row(skewed):
    rng = np.random.default_rng(int(skewed))
    num_slots, rows, m = 8, 50, 3000
    slot = np.zeros(m, np.int32) if skewed else rng.integers(0, num_slots, m).astype(np.int32)
    local = rng.integers(0, rows, m).astype(np.int32)
    slot[rng.random(m) < 0.4] = -1  # padding
    valid = slot >= 0
    distinct = {s: np.unique(local[valid & (slot == s)]) for s in range(num_slots)}
    most = max(d.size for d in distinct.values())
    capacity = 50 if not skewed else most - 1  # skewed: owner 0 gets one key too many

    ask, entry, fits = _layout(slot, local, num_slots, rows, capacity)
    assert bool(fits) == (most <= capacity)
    if not fits:
        return
    place_owner, place_row = entry // capacity, ask.reshape(-1)[entry]
    np.testing.assert_array_equal(place_owner[valid], slot[valid])
    np.testing.assert_array_equal(place_row[valid], local[valid])
    for s in range(num_slots):  # each distinct key asked once, empty places ask `rows`
        asked = ask[s][ask[s] < rows]
        np.testing.assert_array_equal(np.sort(asked), distinct[s])
        assert np.all(ask[s][asked.size :] == rows)


def test_packed_keys_out_of_int32_range_name_the_group():
    check_packed_range("g", 2**20, 1024)  # 1024 << 20 fits
    with pytest.raises(UserInputError, match="shard group 'g'.*2097152 entries"):
        check_packed_range("g", 2**21, 1024)


@pytest.mark.parametrize("spare", [0, 8, -1])
def test_compacted_entries_give_the_same_layout_or_do_not_fit(spare):
    """``real``: the valid entries compacted into [real] before the dedupe. With room for
    all of them (spare >= 0) the layout places every entry as without compaction (first
    entries pointing at original positions); one entry too many makes ``fits`` false."""
    rng = np.random.default_rng(7)
    num_slots, rows, m, capacity = 8, 50, 3000, 60
    slot = rng.integers(0, num_slots, m).astype(np.int32)
    local = rng.integers(0, rows, m).astype(np.int32)
    slot[rng.random(m) < 0.5] = -1
    valid = slot >= 0
    real = int(valid.sum()) + spare

    def build(slot_m, local_m, real):
        layout = Buckets.build(slot_m, local_m, num_slots, rows, capacity, (), real=real)
        return layout.ask_sc, layout.entry_m, layout.fits, layout.most, layout.first_sc

    ask, entry, fits, most, first = [
        np.asarray(x) for x in jax.jit(build, static_argnums=2)(slot, local, real)
    ]
    full = [np.asarray(x) for x in jax.jit(build, static_argnums=2)(slot, local, None)]
    assert bool(fits) == (spare >= 0)
    assert int(most) <= int(full[3])
    if spare < 0:
        return
    np.testing.assert_array_equal(ask, full[0])
    np.testing.assert_array_equal(entry[valid], full[1][valid])
    placed = first < m  # each place's first entry: a valid entry of that place's key
    assert np.all(entry[first[placed]] == np.flatnonzero(placed.reshape(-1)))
