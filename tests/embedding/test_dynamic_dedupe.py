"""Hash dedupe of 64-bit keys (dynamic.key_dedupe) and the hash table's key-value
priority (dynamic.hash_table.resolve_shard), which lets owners skip sorting; the
resolve tests run on the XLA path and on the C++ kernel (kernels.dynamic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding.dynamic.hash_table import home_slots, init_shard, resolve_shard
from lf_jax.embedding.dynamic.key_dedupe import LEADER_SALT, key_leaders, owner_ranks
from lf_jax.embedding.dynamic.keys import key_hash, split_keys
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.kernels.dynamic import resolve_shard_fused

# jitted (policy and insert static): one program per key count, as the engine runs them,
# instead of the ops (and the conds and loops) of resolve_shard dispatched one by one
RESOLVERS = {
    name: jax.jit(fn, static_argnums=(5, 6))
    for name, fn in (("xla", resolve_shard), ("fused", resolve_shard_fused))
}


def _colliding_pair() -> np.ndarray:
    """Two distinct 64-bit keys whose 32-bit leader hash is equal (birthday search)."""
    keys = np.arange(1, 300_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    hashes = key_hash(np, *split_keys(keys), LEADER_SALT)
    order = np.argsort(hashes, kind="stable")
    same = np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]
    assert same.size, "no 32-bit collision among 300,000 keys"
    return keys[order[same[0] : same[0] + 2]]


def test_key_leaders_groups_equal_keys_even_when_their_hashes_collide():
    pair = _colliding_pair()
    # same hi / different lo, same lo / different hi, the colliding pair, repeats, invalids
    keys = np.array([5, 5 + 2**32, 2**32, 7, *pair, 7, 5, *pair, 2**32, 0], np.uint64)
    valid = np.ones(keys.size, bool)
    valid[-1] = False
    leader = np.asarray(key_leaders(*map(jnp.asarray, (*split_keys(keys), valid))))
    for i in range(keys.size):
        if not valid[i]:
            assert leader[i] == i
            continue
        assert valid[leader[i]] and keys[leader[i]] == keys[i] and leader[leader[i]] == leader[i]
        same = [j for j in range(keys.size) if valid[j] and keys[j] == keys[i]]
        assert {int(leader[j]) for j in same} == {int(leader[i])}


def test_owner_ranks_match_a_set_reference():
    rng = np.random.default_rng(3)
    keys = rng.choice(rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64), 300)
    valid = rng.random(300) < 0.8
    owner = (keys % np.uint64(5)).astype(np.int32)
    hi, lo = split_keys(keys)
    leader, send, rank, load = map(
        np.asarray,
        owner_ranks(*map(jnp.asarray, (owner, hi, lo, valid)), 5),
    )
    # one sent entry per distinct valid key, which every entry of the key leads to
    assert sorted(keys[send].tolist()) == sorted(set(keys[valid].tolist()))
    assert send[leader[valid]].all() and (keys[leader[valid]] == keys[valid]).all()
    for o in range(5):  # ranks 0 .. load - 1 among the owner's sent entries, entry order
        mine = np.nonzero(send & (owner == o))[0]
        assert load[o] == mine.size and rank[mine].tolist() == list(range(mine.size))


@pytest.mark.parametrize("kernel", list(RESOLVERS))
def test_resolve_shard_gives_each_key_the_same_slot_in_any_order(kernel):
    """40 keys compete for 16 slots (windows of 4): the smaller key wins, whatever the
    entry order, so every permutation gives each key the same slot and state."""
    policy = DynamicPolicy(eviction="none", probe_limit=4)
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    results = []
    for perm in [np.argsort(keys), *(rng.permutation(40) for _ in range(3))]:
        hi, lo = split_keys(keys[perm])
        slot, new, state = RESOLVERS[kernel](
            init_shard(16, policy), jnp.asarray(hi), jnp.asarray(lo), jnp.ones(40, bool), 1, policy
        )
        by_key = dict(zip(keys[perm].tolist(), np.asarray(slot).tolist(), strict=True))
        results.append((by_key, {k: np.asarray(v).tolist() for k, v in state.items()}))
    assert sum(s >= 0 for s in results[0][0].values()) == 16
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("kernel", list(RESOLVERS))
def test_resolve_shard_with_repeated_keys_equals_distinct_keys(kernel):
    """Repeats (hits and misses, with admission and lru eviction, invalid entries among
    them) give every entry its key's slot, the same state and counters as the distinct
    keys alone, and mark one entry per inserted key new."""
    policy = DynamicPolicy(eviction="lru", probe_limit=4, admit_after=2, sketch_width=64)
    rng = np.random.default_rng(1)
    pool = rng.integers(0, 2**63, 60, dtype=np.int64).astype(np.uint64)
    distinct_state = repeated_state = init_shard(32, policy)
    for step in range(1, 7):
        keys = np.unique(rng.choice(pool, 30))
        hi, lo = split_keys(keys)
        slot, new, distinct_state = RESOLVERS[kernel](
            distinct_state, *map(jnp.asarray, (hi, lo, np.ones(keys.size, bool))), step, policy
        )
        # every key at least once, 45 repeats, 4 invalid entries (keys of this step or not)
        entries = np.concatenate([keys, rng.choice(keys, 40), keys[:5], keys[:2], pool[:2]])
        order = rng.permutation(entries.size)
        entries, valid = entries[order], (np.arange(entries.size) < entries.size - 4)[order]
        r_hi, r_lo = split_keys(entries)
        r_slot, r_new, repeated_state = RESOLVERS[kernel](
            repeated_state, *map(jnp.asarray, (r_hi, r_lo, valid)), step, policy
        )
        by_key = dict(zip(keys.tolist(), np.asarray(slot).tolist(), strict=True))
        r_slot, r_new = np.asarray(r_slot), np.asarray(r_new)
        want = [by_key[k] if v else -1 for k, v in zip(entries.tolist(), valid, strict=True)]
        assert r_slot.tolist() == want
        assert sorted(entries[r_new].tolist()) == sorted(keys[np.asarray(new)].tolist())
        for name, value in distinct_state.items():
            np.testing.assert_array_equal(np.asarray(repeated_state[name]), np.asarray(value))
    assert np.asarray(distinct_state["counters"])[0, 3] > 0  # some inserts


def _find_reference(key_hi, key_lo, alive, hi, lo, capacity, policy):
    """Slot of each query key by whole-window comparison (-1: absent)."""
    home = np.asarray(home_slots(jnp.asarray(hi), jnp.asarray(lo), capacity, policy))
    out = []
    for h, q_hi, q_lo in zip(home, hi, lo, strict=True):
        window = [(h + j) % capacity for j in range(policy.probe_limit)]
        hits = [c for c in window if alive[c] and key_hi[c] == q_hi and key_lo[c] == q_lo]
        out.append(hits[0] if hits else -1)
    return out


@pytest.mark.parametrize("kernel", list(RESOLVERS))
def test_find_compares_both_halves_and_liveness_past_low_half_collisions(kernel):
    """Slots filled from 6 keys that share low halves (high half 0 or 1, low half 1..3),
    some expired: the low-half-first find (and its whole-window branch) returns the first
    alive slot holding the whole key, like a whole-window comparison; also on a table of
    distinct random keys, each in its window (no shared low half)."""
    policy = DynamicPolicy(probe_limit=4, ttl_steps=2)
    step, rng = 6, np.random.default_rng(0)
    few = np.array([(h << 32) + lo for h in (0, 1) for lo in (1, 2, 3)], np.uint64)
    many = rng.integers(1, 2**63, 40, dtype=np.uint64)
    cases = [(8, rng.choice(few, 8), few) for _ in range(6)] + [(64, many, many)]
    found = []
    for capacity, stored, queries in cases:
        key_hi, key_lo = split_keys(np.zeros(capacity, np.uint64))
        if capacity == 8:
            key_hi, key_lo = split_keys(stored)
        else:  # each key at a free slot of its window
            homes = np.asarray(home_slots(*map(jnp.asarray, split_keys(stored)), capacity, policy))
            for key, home in zip(stored, homes, strict=True):
                free = [c % capacity for c in range(home, home + 4) if key_lo[c % capacity] == 0]
                if free:
                    (key_hi[free[-1]],), (key_lo[free[-1]],) = split_keys(np.array([key]))
        last = rng.integers(-1, step + 1, capacity).astype(np.int32)  # alive: 4..6
        state = init_shard(capacity, policy)
        state.update(key_hi=jnp.asarray(key_hi), key_lo=jnp.asarray(key_lo), last=last)
        hi, lo = split_keys(queries)
        slot, new, _ = RESOLVERS[kernel](
            state, *map(jnp.asarray, (hi, lo, np.ones(hi.size, bool))), step, policy, False
        )
        alive = (last >= 0) & (step - last <= policy.ttl_steps)
        want = _find_reference(key_hi, key_lo, alive, hi, lo, capacity, policy)
        assert np.asarray(slot).tolist() == want and not np.asarray(new).any()
        found.append(sum(s >= 0 for s in want))
    assert sum(found[:-1]) >= 4 and found[-1] >= 4
