"""Dict-based reference for dynamic tables: the documented hash-table algorithm in plain
Python loops, one key at a time (lf_jax.embedding.dynamic.hash_table states it).

Each shard is a list of slots (key or None) with ``last`` and ``freq`` per slot and a
numpy count-min sketch; rows and optimizer slots live in dicts keyed by the 64-bit key.
Row updates go through the numpy embedding oracle on a temporary table of the step's
present keys. Tests compare it with ``DynamicTables.snapshot`` after every step.

Example:
    >>> ref = DynamicReference(spec, features, shards=8)
    >>> ids = ref.resolve({"p": [[7, 2**40], [7]]}, step=1)   # {"p": [[k, k'], [k]]} or None
    >>> acts = ref.step({"p": [[7, 2**40], [7]]}, grads, step=1)
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from lf_jax.embedding.dynamic.keys import (
    HOME_SALT,
    OWNER_SALT,
    SKETCH_SALT,
    key_hash,
    salt,
    split_keys,
)
from lf_jax.testing import embedding_oracle as oracle


def _hash(key: int, base: int, seed: int, index: int = 0) -> int:
    hi, lo = split_keys(np.array([key], np.uint64))
    return int(key_hash(np, hi, lo, salt(base, seed, index))[0])


class _Shard:
    def __init__(self, capacity: int, depth: int, width: int):
        self.key: list[int | None] = [None] * capacity
        self.last = [-1] * capacity
        self.freq = [0] * capacity
        self.sketch = np.zeros((depth, width), np.int64)


class DynamicReference:
    """One dynamic table over ``shards`` shards, fed by ``features`` (see module docstring)."""

    def __init__(self, spec, features: Sequence, shards: int, initial_rows):
        self.spec, self.policy = spec, spec.dynamic
        self.features = [f for f in features if f.table == spec.name]
        self.capacity = spec.vocab_size // shards
        self.num_shards = shards
        sketch = (self.policy.sketch_depth, self.policy.sketch_width)
        self.shards = [
            _Shard(self.capacity, *(sketch if self.policy.admit_after > 1 else (1, 1)))
            for _ in range(shards)
        ]
        self.initial_rows = initial_rows  # keys (uint64 [N]) -> [N, D] rows
        self.rows: dict[int, np.ndarray] = {}
        self.slots: dict[int, dict[str, np.ndarray]] = {}
        self.counts = {"hits": 0, "misses": 0, "not_admitted": 0, "inserts": 0}
        self.counts.update({"evictions": 0, "refused": 0})

    # ----- the hash table -----------------------------------------------------------------
    def _alive(self, shard: _Shard, c: int, t: int) -> bool:
        ttl = self.policy.ttl_steps
        return shard.key[c] is not None and (ttl is None or t - shard.last[c] <= ttl)

    def _window(self, key: int) -> list[int]:
        home = _hash(key, HOME_SALT, self.policy.seed) % self.capacity
        probes = min(self.policy.probe_limit, self.capacity)
        return [(home + i) % self.capacity for i in range(probes)]

    def owner(self, key: int) -> int:
        return _hash(key, OWNER_SALT, self.policy.seed) % self.num_shards

    def _resolve_shard(self, shard: _Shard, keys: list[int], t: int) -> list[int]:
        policy, touched, misses = self.policy, set(), []
        for key in keys:
            found = [
                c for c in self._window(key) if self._alive(shard, c, t) and shard.key[c] == key
            ]
            if found:
                shard.last[found[0]] = t
                shard.freq[found[0]] += 1
                touched.add(found[0])
                self.counts["hits"] += 1
            else:
                misses.append(key)
        self.counts["misses"] += len(misses)
        admitted = misses
        if policy.admit_after > 1:
            cells = {
                k: [
                    _hash(k, SKETCH_SALT, policy.seed, d) % policy.sketch_width
                    for d in range(policy.sketch_depth)
                ]
                for k in misses
            }
            for k in misses:
                for d, cell in enumerate(cells[k]):
                    shard.sketch[d, cell] += 1
            admitted = [
                k
                for k in misses
                if min(shard.sketch[d, cell] for d, cell in enumerate(cells[k]))
                >= policy.admit_after
            ]
        self.counts["not_admitted"] += len(misses) - len(admitted)
        pending, taken, inserted = sorted(admitted), set(), []
        for _ in range(min(policy.probe_limit, self.capacity)):
            proposals: dict[int, int] = {}
            for key in pending:  # ascending: the first proposer of a slot is the smallest key
                window = self._window(key)
                free = [c for c in window if not self._alive(shard, c, t) and c not in taken]
                if free:
                    proposals.setdefault(free[0], key)
                    continue
                if policy.eviction == "none":
                    continue
                evictable = [
                    c
                    for c in window
                    if self._alive(shard, c, t) and c not in touched and c not in taken
                ]
                if not evictable:
                    continue

                def score(c, window=window):
                    recency = (shard.last[c], window.index(c))
                    return (shard.freq[c], *recency) if policy.eviction == "lfu" else recency

                proposals.setdefault(min(evictable, key=score), key)
            for c, key in proposals.items():
                old = shard.key[c]
                if old is not None:
                    self.counts["evictions"] += int(self._alive(shard, c, t))
                    self.rows.pop(old, None)
                    self.slots.pop(old, None)
                shard.key[c], shard.last[c], shard.freq[c] = key, t, 1
                taken.add(c)
                pending.remove(key)
                inserted.append(key)
        self.counts["refused"] += len(pending)
        self.counts["inserts"] += len(inserted)
        return inserted

    def resolve(self, keys_by_feature: Mapping[str, Sequence[Sequence[int]]], t: int) -> None:
        """Finds, admits and inserts the step's distinct keys, shard by shard."""
        distinct = sorted(
            {int(k) for bags in keys_by_feature.values() for bag in bags for k in bag}
        )
        inserted: list[int] = []
        for s, shard in enumerate(self.shards):
            inserted += self._resolve_shard(shard, [k for k in distinct if self.owner(k) == s], t)
        if inserted:
            fresh = self.initial_rows(np.array(inserted, np.uint64))
            for key, row in zip(inserted, fresh, strict=True):
                self.rows[key] = np.asarray(row, np.float64)
                self.slots[key] = {
                    n: np.full(shape, self.spec.optimizer.slot_init(n), np.float64)
                    for n, shape in self.spec.optimizer.slot_shapes(self.spec.dim).items()
                }

    def alive_keys(self, t: int) -> list[int]:
        return sorted(
            s.key[c] for s in self.shards for c in range(self.capacity) if self._alive(s, c, t)
        )

    # ----- a training step ----------------------------------------------------------------
    def step(self, keys_by_feature: Mapping, grads: Mapping, t: int) -> dict[str, np.ndarray]:
        """resolve, then the oracle lookup and sparse step on the present keys; returns the
        activations (computed before the update)."""
        self.resolve(keys_by_feature, t)
        present = self.alive_keys(t)
        index = {k: i for i, k in enumerate(present)}
        ids, weights = {}, {}
        for f in self.features:
            bags = keys_by_feature[f.name]
            ids_bl = np.full((len(bags), f.max_ids), -1, np.int64)
            for b, bag in enumerate(bags):
                for i, k in enumerate(list(bag)[: f.max_ids]):
                    ids_bl[b, i] = index.get(int(k), -1)
            ids[f.name], weights[f.name] = ids_bl, np.ones(ids_bl.shape)
        name, dim = self.spec.name, self.spec.dim
        # the step's temporary table: one row per present key, plus one never-read row
        table = np.stack([*(self.rows[k] for k in present), np.zeros(dim)])
        slot_shapes = self.spec.optimizer.slot_shapes(dim)
        slots = {
            name: {
                n: np.stack([*(self.slots[k][n] for k in present), np.zeros(shape)])
                for n, shape in slot_shapes.items()
            }
        }
        acts = oracle.oracle_lookup(self.features, {name: table}, (ids, weights))
        temp_spec = dataclasses.replace(self.spec, vocab_size=len(present) + 1)
        tables, slots = oracle.oracle_step(
            {name: table}, slots, self.features, [temp_spec], (ids, weights), grads, t
        )
        for i, key in enumerate(present):
            self.rows[key] = tables[name][i]
            self.slots[key] = {n: slots[name][n][i] for n in slot_shapes}
        return acts
