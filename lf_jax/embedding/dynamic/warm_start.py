"""Warm start of a dynamic table from rows trained elsewhere (a static table, an IdMap).

``warm_start(dyn, state, table, keys, rows)`` returns ``state`` with dynamic table
``table`` holding exactly ``keys`` (ints in [0, 2**64) or strings, fingerprinted as in
training) with their ``rows`` [K, D] and optimizer slots (``slots``, else their initial
values). Keys are placed as a restore places them (lf_jax.embedding.dynamic.checkpoint:
each at its owner ``hash % shards``, ascending, in the first free slot of its window);
every key is stamped with the state's step and seen once, so TTL and LRU count from the
warm start. Other tables, the sketch and the counters are kept. A key that finds no slot
is an error naming the table (choose fewer keys, e.g. the most frequent, or more rows),
never a silent drop.

Example (the rows of a static member table, known ids by an IdMap):
    >>> ids = ["urn:li:member:1", "urn:li:member:7"]
    >>> rows = static_table_vd[id_map.lookup(ids)]            # [2, D]
    >>> state = warm_start(dyn, dyn.init(jax.random.key(0)), "member", ids, rows)
"""

from collections.abc import Mapping, Sequence

import numpy as np

from lf_jax.checks import first_duplicate
from lf_jax.embedding.dynamic.checkpoint import from_checkpoint, to_checkpoint
from lf_jax.embedding.dynamic.keys import join_keys, parse_keys
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.errors import UserInputError


def warm_start(
    dyn: DynamicTables,
    state: Mapping,
    table: str,
    keys: Sequence | np.ndarray,
    rows: np.ndarray,
    slots: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """``state`` with ``table`` holding ``keys`` -> ``rows`` (see module docstring)."""
    if table not in dyn.specs:
        raise UserInputError(
            f"warm_start: '{table}' is not a dynamic table (dynamic: {sorted(dyn.specs)})"
        )
    spec = dyn.specs[table]
    hi, lo, _ = parse_keys(table, list(keys) if not isinstance(keys, np.ndarray) else keys, 1)
    keys_k = join_keys(hi[:, 0], lo[:, 0])
    duplicate = first_duplicate(keys_k)
    if duplicate is not None:
        raise UserInputError(
            f"warm_start '{table}': key {duplicate[0]} (as a 64-bit key) appears twice, "
            f"at positions {duplicate[1]} and {duplicate[2]}"
        )
    rows = np.asarray(rows, np.float32)
    if rows.shape != (keys_k.size, spec.dim):
        raise UserInputError(
            f"warm_start '{table}': rows must be [{keys_k.size}, {spec.dim}] (keys x dim), "
            f"got {list(rows.shape)}"
        )
    shapes = spec.optimizer.slot_shapes(spec.dim)
    given = dict(slots or {})
    unknown = sorted(set(given) - set(shapes))
    if unknown:
        raise UserInputError(
            f"warm_start '{table}': optimizer slot(s) {unknown} unknown (slots: {sorted(shapes)})"
        )
    order = np.argsort(keys_k, kind="stable")
    part_slots = {}
    for name, shape in shapes.items():
        want = (keys_k.size, *shape)
        value = given.get(name)
        if value is None:
            value = np.full(want, spec.optimizer.slot_init(name), np.float32)
        value = np.asarray(value, np.float32)
        if value.shape != want:
            raise UserInputError(
                f"warm_start '{table}': slot '{name}' must be {list(want)}, got {list(value.shape)}"
            )
        part_slots[name] = value[order]
    ckpt = to_checkpoint(dyn, state)
    part = ckpt["dynamic"][table]
    part.update(
        keys=keys_k[order],
        rows=rows[order],
        slots=part_slots,
        last=np.full(keys_k.size, ckpt["step"], np.int32),
        freq=np.ones(keys_k.size, np.int32),
    )
    return from_checkpoint(dyn, ckpt)
