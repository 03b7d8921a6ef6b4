"""What a dynamic table costs and holds per shard: one row per table, like the planner's.

``explain_tables(tables, shards)`` needs only the specs and each table's shard count
(``lf_jax.embedding.dynamic.layout.table_shards`` of the plan; ``lf-jax plan`` runs it
without devices); ``explain(dyn, state)`` adds a run's counters. Per
dynamic table: shards, slots per shard, the policy, bytes per shard (rows + optimizer
slots in the collection's group; the hash table's keys, last and freq, 16 bytes a slot;
the sketch) and, given the distinct keys its traffic carries (``expected_keys``, e.g. the
config's ``embedding.tables.<t>.dynamic.expected_keys``), the expected occupancy:

  * all shards: min(1, keys / capacity);
  * the fullest shard: keys hash uniformly to shards, so a shard holds about
    keys/S + 3 standard deviations (sqrt(keys/S * (1 - 1/S))), at most its slots;
  * keys beyond the capacity are evicted (lru/lfu) or refused (none) as they come.

A key can also find its window of ``probe_limit`` slots full while its shard has room.
``window_fill`` estimates how often by placing the keys (uniform owners and home slots,
seed 0) one by one in the first free slot of their window, without eviction, on the
table's shards (scaled down to at most 2**15 slots in all, at the same load):

  * ``window_occupancy``: the slots filled (all shards), below the plain estimate when
    windows or shards fill first;
  * ``window_refused``: the keys left without a slot (scaled back to ``expected_keys``):
    refused under ``none``; under lru/lfu they evict a live key of their window instead.

The counters of a run (``refused``, ``evictions``) say what happened.

Example:
    >>> rows = explain_tables({"post": post_spec}, {"post": 8}, expected_keys={"post": 1000})
    >>> print(format_rows(rows))
    >>> explain(dyn, state)            # the same rows with occupancy and counters
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.spec import TableSpec

INDEX_BYTES_PER_SLOT = 16  # key hi + lo, last, freq: 4 bytes each
SIMULATED_SLOTS = 1 << 15  # window_fill's largest simulated table (all shards)


def window_fill(keys: int, shards: int, capacity: int, probes: int) -> tuple[float, int]:
    """(occupancy, keys without a slot) of ``keys`` keys placed without eviction in windows
    of ``probes`` slots on ``shards`` shards of ``capacity`` slots (see module docstring).

    >>> window_fill(1000, 8, 125, 8)      # as many keys as slots: windows fill first
    (0.884, 116)
    """
    scale = min(1.0, SIMULATED_SLOTS / (shards * capacity))
    slots = max(probes, round(capacity * scale))
    n = min(round(keys * slots / capacity), 4 * shards * slots)  # beyond 4x: all full
    rng = np.random.default_rng(0)
    owner, home = rng.integers(0, shards, n), rng.integers(0, slots, n)
    used = np.zeros((shards, slots), bool)
    offsets = np.arange(min(probes, slots))
    for o, h in zip(owner.tolist(), home.tolist(), strict=True):
        window = (h + offsets) % slots
        free = window[~used[o, window]]
        if free.size:
            used[o, free[0]] = True
    placed = int(used.sum())
    left = (n - placed) * keys / max(n, 1) if n else 0.0
    return placed / (shards * slots), round(left)


def _expected(keys: int, shards: int, capacity: int, probes: int, eviction: str) -> dict:
    """Expected occupancy (all shards, fullest shard, with probe windows) of ``keys``
    distinct keys."""
    per_shard = keys / shards
    spread = 3 * math.sqrt(per_shard * (1 - 1 / shards))
    over = keys - shards * capacity
    fate = "evicted (" + eviction + ")" if eviction != "none" else "refused"
    occupancy, refused = window_fill(keys, shards, capacity, probes)
    return {
        "window_occupancy": occupancy,
        "window_refused": refused,
        "expected_keys": keys,
        "expected_occupancy": min(1.0, keys / (shards * capacity)),
        "expected_occupancy_max": min(1.0, (per_shard + spread) / capacity),
        "expected_note": (
            f"{over:,} keys more than slots: {fate} as they come"
            if over > 0
            else f"{-over:,} slots to spare"
        ),
    }


def explain_tables(
    tables: Mapping[str, TableSpec],
    shards: Mapping[str, int],
    expected_keys: Mapping[str, int] | None = None,
    counters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per dynamic table of ``tables`` (others are skipped) on its ``shards[name]``
    shards (see module docstring); ``expected_keys`` 0 or absent: no expected occupancy."""
    rows = []
    for name, spec in tables.items():
        policy = spec.dynamic
        if policy is None:
            continue
        count = shards[name]
        capacity = spec.vocab_size // count
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
        probes = min(policy.probe_limit, capacity)
        full = "evicts by " + policy.eviction if policy.eviction != "none" else "refuses"
        row: dict[str, Any] = {
            "table": name,
            "shards": count,
            "slots_per_shard": capacity,
            "probe_limit": probes,
            "bytes_per_shard": row_bytes + capacity * INDEX_BYTES_PER_SLOT + sketch,
            "reason": (
                f"{spec.vocab_size} rows over {count} shards by hash(key) % shards; keys "
                f"{admission}; a full window of {probes} slots {full}{forgetting}"
            ),
        }
        keys = (expected_keys or {}).get(name, 0)
        if keys:
            row.update(_expected(keys, count, capacity, probes, policy.eviction))
        row.update((counters or {}).get(name, {}))
        rows.append(row)
    return rows


def explain(
    dyn: DynamicTables, state: Mapping | None = None, expected_keys: Mapping | None = None
) -> list[dict[str, Any]]:
    """``explain_tables`` of ``dyn``'s tables; with ``state``, its counters and occupancy."""
    counters = dyn.counters(state) if state is not None else None
    shards = {name: layout.shards for name, layout in dyn.layouts.items()}
    return explain_tables(dyn.specs, shards, expected_keys, counters)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as text, one paragraph per table (for ``lf-jax plan`` and the train log)."""
    lines = []
    for row in rows:
        lines.append(
            f"dynamic {row['table']}: {row['shards']} shards x {row['slots_per_shard']:,} "
            f"slots ({row['bytes_per_shard']:,} bytes per shard), probe limit "
            f"{row['probe_limit']}; "
            f"{row['reason']}"
        )
        if "expected_keys" in row:
            lines.append(
                f"  expected: {row['expected_keys']:,} keys -> occupancy "
                f"{row['expected_occupancy']:.2f} (fullest shard "
                f"{row['expected_occupancy_max']:.2f}); {row['expected_note']}"
            )
            fate = "refused" if "refused" in row["reason"] else "evict a live key"
            lines.append(
                f"  probe windows of {row['probe_limit']} (keys placed without eviction): "
                f"occupancy {row['window_occupancy']:.2f}, {row['window_refused']:,} keys "
                f"find their window full ({fate})"
            )
        if "occupancy" in row:
            lines.append(
                f"  now: occupancy {row['occupancy']:.3f} (fullest shard "
                f"{row['occupancy_max']:.3f}), inserts {row['inserts']:,}, evictions "
                f"{row['evictions']:,}, refused {row['refused']:,}, not admitted "
                f"{row['not_admitted']:,}, probe max {row['probe_max']}"
            )
    return "\n".join(lines)
