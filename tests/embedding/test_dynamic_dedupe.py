"""Hash dedupe of 64-bit keys (dynamic.key_dedupe) and the hash table's key-value
priority (dynamic.hash_table.resolve_shard), which lets owners skip sorting."""

import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.dynamic.hash_table import init_shard, resolve_shard
from lf_jax.embedding.dynamic.key_dedupe import LEADER_SALT, group_by_owner, key_leaders
from lf_jax.embedding.dynamic.keys import join_keys, key_hash, split_keys
from lf_jax.embedding.dynamic.policy import DynamicPolicy


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


def test_group_by_owner_matches_a_set_reference():
    rng = np.random.default_rng(3)
    keys = rng.choice(rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64), 300)
    valid = rng.random(300) < 0.8
    owner = (keys % np.uint64(5)).astype(np.int32)
    hi, lo = split_keys(keys)
    (u_owner, u_hi, u_lo), inverse = group_by_owner(
        jnp.asarray(owner), jnp.asarray(hi), jnp.asarray(lo), jnp.asarray(valid), 5
    )
    u_owner, inverse = np.asarray(u_owner), np.asarray(inverse)
    u_keys = join_keys(np.asarray(u_hi), np.asarray(u_lo))
    n = len(set(keys[valid].tolist()))
    assert (np.diff(u_owner) >= 0).all() and (u_owner[n:] == 5).all() and (u_keys[n:] == 0).all()
    assert sorted(u_keys[:n].tolist()) == sorted(set(keys[valid].tolist()))
    assert (u_owner[:n] == (u_keys[:n] % np.uint64(5)).astype(np.int32)).all()
    np.testing.assert_array_equal(u_keys[inverse[valid]], keys[valid])


def test_resolve_shard_gives_each_key_the_same_slot_in_any_order():
    """40 keys compete for 16 slots (windows of 4): the smaller key wins, whatever the
    entry order, so every permutation gives each key the same slot and state."""
    policy = DynamicPolicy(eviction="none", probe_limit=4)
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    results = []
    for perm in [np.argsort(keys), *(rng.permutation(40) for _ in range(3))]:
        hi, lo = split_keys(keys[perm])
        slot, new, state = resolve_shard(
            init_shard(16, policy), jnp.asarray(hi), jnp.asarray(lo), jnp.ones(40, bool), 1, policy
        )
        by_key = dict(zip(keys[perm].tolist(), np.asarray(slot).tolist(), strict=True))
        results.append((by_key, {k: np.asarray(v).tolist() for k, v in state.items()}))
    assert sum(s >= 0 for s in results[0][0].values()) == 16
    assert all(r == results[0] for r in results[1:])
