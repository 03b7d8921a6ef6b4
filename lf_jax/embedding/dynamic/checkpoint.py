"""Mesh-free checkpoints of dynamic tables: keys with their rows, restored onto any mesh.

``to_checkpoint`` writes, as numpy, the collection's logical form of every static table
and, per dynamic table, its alive keys with rows, optimizer slots, ``last`` and ``freq``
(``DynamicTables.snapshot``), the count-min sketch summed over shards and the counters.
``from_checkpoint`` places those keys on the shards of another mesh, device count or
placement (lf_jax.embedding.dynamic.layout): each key goes to its new owner
(``key_hash % shards``) and, in ascending key order, to the first free slot of its new
window. Every new shard gets the summed sketch, which
keeps count-min's guarantee (never an under-count) but may count a key early where
keys of the old shards share counters. A key with no free slot in its window is an
error naming the table (restore onto more rows or a larger ``probe_limit``), never a
silent drop.

``rehash_logical`` does the same for the trainer's checkpoints (lf_jax.train.checkpoint),
which hold tables in the collection's logical form and the hash tables per shard.

Example:
    >>> ckpt = to_checkpoint(dyn8, state8)             # host numpy pytree
    >>> state4 = from_checkpoint(dyn4, ckpt)           # same tables, 4 devices
    >>> logical4, index4 = rehash_logical(dyn4, logical8, index8)
"""

from collections.abc import Mapping

import jax
import numpy as np

from lf_jax.embedding.dynamic.hash_table import (
    COUNTERS,
    alive_slots,
    counter_totals,
    split_totals,
)
from lf_jax.embedding.dynamic.keys import HOME_SALT, join_keys, key_hash, salt, split_keys
from lf_jax.embedding.dynamic.layout import key_owners
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.errors import UserInputError


def to_checkpoint(dyn: DynamicTables, state: Mapping) -> dict:
    """{"static": logical static tables and slots, "dynamic": {table: keys, rows, ...},
    "step"} as numpy."""
    logical = jax.device_get(jax.jit(dyn.collection.to_logical)(state["embedding"]))
    index = jax.device_get(state["index"])
    dynamic = dyn.snapshot(state)
    for name, part in dynamic.items():
        part["sketch"] = index[name]["sketch"].sum(axis=0)
        part["counters"] = _merged_counters(index[name]["counters"])
    return {
        "static": {
            "tables": {n: v for n, v in logical["tables"].items() if n not in dyn.specs},
            "slots": {n: v for n, v in logical["slots"].items() if n not in dyn.specs},
        },
        "dynamic": dynamic,
        "step": int(logical["step"]),
    }


def _merged_counters(counts: np.ndarray) -> np.ndarray:
    """Two-word counters [S, 2, len(COUNTERS)] per shard -> exact totals [len(COUNTERS)]
    (int64): sums, probe_max the largest."""
    return np.asarray(counter_totals(counts), np.int64)


def _place_keys(
    dyn: DynamicTables, name: str, keys: np.ndarray, strict: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(shard, slot) of each key on ``dyn``'s mesh: ascending keys, first free slot. A key
    without a free slot is an error, or with ``strict`` False slot -1 (left out)."""
    layout = dyn.layouts[name]
    policy, capacity, shards = layout.policy, layout.capacity, layout.shards
    hi, lo = split_keys(keys)
    owner = layout.owners(keys)
    home = key_hash(np, hi, lo, salt(HOME_SALT, policy.seed)) % np.uint32(capacity)
    used = np.zeros((shards, capacity), bool)
    slot = np.full(keys.shape, -1, np.int64)
    probes = min(policy.probe_limit, capacity)
    for i in np.argsort(keys, kind="stable"):
        window = (int(home[i]) + np.arange(probes)) % capacity
        free = window[~used[owner[i], window]]
        if not free.size and strict:
            raise UserInputError(
                f"dynamic table '{name}': key {int(keys[i])} finds no free slot among its "
                f"{probes} on shard {int(owner[i])} of {shards} ({capacity} slots each, "
                f"{keys.size} keys to restore); restore onto more rows (vocab_size) or a "
                "larger probe_limit"
            )
        if free.size:
            slot[i] = free[0]
            used[owner[i], free[0]] = True
    return owner, slot


def fitting_keys(dyn: DynamicTables, name: str, keys: np.ndarray) -> np.ndarray:
    """[K] bool: the uint64 ``keys`` that find a slot when placed together (ascending, each
    in the first free slot of its window on ``dyn``'s mesh), as a restore places them."""
    return _place_keys(dyn, name, np.asarray(keys, np.uint64), strict=False)[1] >= 0


def _shard_index(dyn: DynamicTables, name: str, part: Mapping, owner, slot) -> dict:
    """Per-device hash tables [S, ...] (numpy) holding ``part``'s keys at (owner shard,
    slot); every shard of the table gets the summed sketch, its first the merged
    counters (devices outside a table_wise_row_wise group stay empty)."""
    layout = dyn.layouts[name]
    devices, capacity = dyn.num_devices, layout.capacity
    device = np.asarray(layout.devices, np.int64)[owner]
    hi, lo = split_keys(np.asarray(part["keys"], np.uint64))
    shard: dict[str, np.ndarray] = {
        "key_hi": np.zeros((devices, capacity), np.uint32),
        "key_lo": np.zeros((devices, capacity), np.uint32),
        "last": np.full((devices, capacity), -1, np.int32),
        "freq": np.zeros((devices, capacity), np.int32),
    }
    for field, values in (("key_hi", hi), ("key_lo", lo)):
        shard[field][device, slot] = values
    shard["last"][device, slot] = part["last"]
    shard["freq"][device, slot] = part["freq"]
    sketch = np.asarray(part["sketch"], np.int32)
    shard["sketch"] = np.zeros((devices, *sketch.shape), np.int32)
    shard["sketch"][list(layout.devices)] = sketch
    counters = np.zeros((devices, 2, len(COUNTERS)), np.int32)
    counters[layout.devices[0]] = split_totals(part["counters"])
    shard["counters"] = counters
    return shard


def _placed(dyn: DynamicTables, index: Mapping) -> dict:
    shardings = dyn.index_shardings()
    return {
        name: {k: jax.device_put(v, shardings[name][k]) for k, v in part.items()}
        for name, part in index.items()
    }


def from_checkpoint(dyn: DynamicTables, ckpt: Mapping) -> dict:
    """DynamicTables state on ``dyn``'s mesh from ``to_checkpoint`` output (any mesh)."""
    coll = dyn.collection
    tables = dict(ckpt["static"]["tables"])
    slots = {n: dict(v) for n, v in ckpt["static"]["slots"].items()}
    index = {}
    for name, spec in dyn.specs.items():
        part = ckpt["dynamic"][name]
        owner, slot = _place_keys(dyn, name, np.asarray(part["keys"], np.uint64))
        row = dyn.layouts[name].logical_rows(part["keys"], slot)
        table = np.zeros((spec.vocab_size, spec.dim), np.float32)
        table[row] = part["rows"]
        tables[name] = table
        slots[name] = {}
        for slot_name, shape in spec.optimizer.slot_shapes(spec.dim).items():
            value = np.full((spec.vocab_size, spec.dim), spec.optimizer.slot_init(slot_name))
            saved = np.asarray(part["slots"][slot_name])
            value[row] = saved if shape else saved[:, None]
            slots[name][slot_name] = value.astype(np.float32)
        index[name] = _shard_index(dyn, name, part, owner, slot)
    return {
        "embedding": coll.state_from_logical(tables, slots, ckpt["step"]),
        "index": _placed(dyn, index),
    }


def rehash_logical(dyn: DynamicTables, logical: Mapping, index: Mapping) -> tuple[dict, dict]:
    """(logical form, placed hash tables) on ``dyn``'s mesh from a logical form
    (``collection.to_logical``, numpy) and per-device hash tables [S_old, C_old, ...]
    written on another device count or placement (a trainer checkpoint's "embedding" and
    "dynamic" items).

    The old table had ``n = vocab_size // C_old`` shards, so the key k in slot c of its
    shard is logical row ``c * n + key_hash(k) % n`` (any placement); it moves, with its
    row, optimizer slots, ``last`` and ``freq``, to the row of its new owner and slot
    (placed as ``from_checkpoint`` places keys). Rows left free read zeros and the slots'
    initial values (an inserted key resets both). Static tables are returned as given.
    """
    step = int(logical["step"])
    tables = dict(logical["tables"])
    slots = {n: dict(v) for n, v in logical["slots"].items()}
    placed = {}
    for name, spec in dyn.specs.items():
        old = {k: np.asarray(v) for k, v in index[name].items()}
        old_shards = spec.vocab_size // old["last"].shape[1]
        alive = np.asarray(alive_slots(old, step, dyn.policies[name]))
        _, slot_s = np.nonzero(alive)
        part = {
            "keys": join_keys(old["key_hi"][alive], old["key_lo"][alive]),
            "last": old["last"][alive],
            "freq": old["freq"][alive],
            "sketch": old["sketch"].sum(axis=0),
            "counters": _merged_counters(old["counters"]),
        }
        owner, slot = _place_keys(dyn, name, part["keys"])
        old_owner = key_owners(part["keys"], old_shards, dyn.policies[name].seed)
        old_rows = slot_s * old_shards + old_owner
        new_rows = dyn.layouts[name].logical_rows(part["keys"], slot)
        table = np.zeros_like(np.asarray(tables[name]))
        table[new_rows] = np.asarray(tables[name])[old_rows]
        tables[name] = table
        for slot_name, value in slots.get(name, {}).items():
            moved = np.full_like(value, spec.optimizer.slot_init(slot_name))
            moved[new_rows] = np.asarray(value)[old_rows]
            slots[name][slot_name] = moved
        placed[name] = _shard_index(dyn, name, part, owner, slot)
    return {**logical, "tables": tables, "slots": slots}, _placed(dyn, placed)
