"""What a dynamic table costs and holds per shard: one row per table, like the planner's.

``explain(dyn)`` gives, per dynamic table: shards, slots per shard, the policy, bytes per
shard (rows + optimizer slots in the collection's group; the hash table's keys, last
and freq, 16 bytes a slot; the sketch) and, given a state, occupancy and counters.

Example:
    >>> for row in explain(dyn, state):
    ...     print(row["table"], row["slots_per_shard"], row["reason"])
"""

from collections.abc import Mapping
from typing import Any

from lf_jax.embedding.dynamic.tables import DynamicTables

INDEX_BYTES_PER_SLOT = 16  # key hi + lo, last, freq: 4 bytes each


def explain(dyn: DynamicTables, state: Mapping | None = None) -> list[dict[str, Any]]:
    """One row per dynamic table (see module docstring); counters when ``state`` is given."""
    counters = dyn.counters(state) if state is not None else {}
    rows = []
    for name, spec in dyn.specs.items():
        policy, capacity = dyn.policies[name], dyn.capacity(name)
        sketch = 4 * policy.sketch_depth * policy.sketch_width if policy.uses_sketch else 0
        row_bytes = capacity * (spec.bytes_per_row + spec.slot_bytes_per_row())
        admission = (
            f"admitted after {policy.admit_after} steps seen (count-min "
            f"{policy.sketch_depth} x {policy.sketch_width})"
            if policy.uses_sketch
            else "admitted at first sight"
        )
        forgetting = (
            f", forgotten after {policy.ttl_steps} steps unseen" if policy.ttl_steps else ""
        )
        row: dict[str, Any] = {
            "table": name,
            "shards": dyn.shards,
            "slots_per_shard": capacity,
            "probe_limit": min(policy.probe_limit, capacity),
            "bytes_per_shard": row_bytes + capacity * INDEX_BYTES_PER_SLOT + sketch,
            "reason": (
                f"{spec.vocab_size} rows over {dyn.shards} shards by hash(key) % shards; keys "
                f"{admission}; a full window of {min(policy.probe_limit, capacity)} slots "
                f"{'evicts by ' + policy.eviction if policy.eviction != 'none' else 'refuses'}"
                f"{forgetting}"
            ),
        }
        row.update(counters.get(name, {}))
        rows.append(row)
    return rows
