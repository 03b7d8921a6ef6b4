"""Delta export of dynamic tables: rows inserted or changed since an exported step go to
the KV store and the ScaNN index as an increment (upsert / delete), so serving follows
training near-line without re-exporting the table.

Why a step is enough: a dynamic table stamps each key that a training step finds or
inserts with that step (``last``, lf_jax.embedding.dynamic.hash_table), and a row changes
only in a step that sees its key (the sparse optimizers update the rows a step looks up;
an inserted key's row is reset). So, for a state exported at step ``s``:

- upserts: the keys alive now with ``last > s`` (new keys, re-inserted keys and trained
  rows; a key seen with a zero gradient is re-sent unchanged);
- deletes: the names exported before (read from the store / index) whose key is no
  longer alive (evicted, expired under ``ttl_steps``, or never re-admitted).

A key is exported under a string name, by default its 64-bit value in decimal (the
feed ranker's ids are its keys); pass ``names`` to map keys back to string ids (keys of
string ids are fingerprints and cannot be inverted). Finding deletes reads every name of
the store or index once (O(exported rows) on the host). Export at step 0 or of a fresh
store is a full export: every alive key is an upsert. ``lf-jax export --delta``
(lf_jax.export.delta_corpus) applies the same increment to an export directory.

Shapes: K alive keys, D dim; TableDelta.upsert_keys [U] uint64, upsert_rows [U, D].

Example:
    >>> with KVStore("/tmp/post_kv", dims=16) as store:
    ...     base = export_delta(dyn, state_at_800, "post", since_step=-1, store=store)
    ...     ...                                          # train on to step 900
    ...     inc = export_delta(dyn, state_at_900, "post", since_step=base.step, store=store)
    >>> inc.upserts, inc.deletes                          # rows written, names removed
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.errors import UserInputError


def decimal_names(keys: np.ndarray) -> list[str]:
    """Default export names: each uint64 key in decimal, e.g. 42 -> "42"."""
    return [str(int(key)) for key in np.asarray(keys, np.uint64)]


@dataclasses.dataclass(frozen=True)
class TableDelta:
    """One table's increment between ``since_step`` and ``step``: the keys to upsert with
    their rows, and the exported names to delete."""

    table: str
    since_step: int
    step: int
    upsert_keys: np.ndarray  # [U] uint64, ascending
    upsert_rows: np.ndarray  # [U, D] float32
    delete_names: list[str]
    alive: int  # keys the table holds at ``step``


@dataclasses.dataclass(frozen=True)
class DeltaCounts:
    """What ``export_delta`` wrote: ``step`` is the next call's ``since_step``."""

    table: str
    step: int
    upserts: int
    deletes: int
    alive: int


def table_delta(
    dyn: DynamicTables,
    state: Mapping,
    table: str,
    since_step: int,
    exported: Iterable[str] = (),
    names: Callable[[np.ndarray], list[str]] = decimal_names,
) -> TableDelta:
    """The increment of dynamic ``table`` in ``state`` ({"embedding", "index"}) since
    ``since_step`` (-1: everything), deleting the ``exported`` names no longer alive."""
    if table not in dyn.specs:
        raise UserInputError(
            f"delta export: '{table}' is not a dynamic table (dynamic: {sorted(dyn.specs)})"
        )
    if isinstance(since_step, bool) or not isinstance(since_step, (int, np.integer)):
        raise UserInputError(f"delta export: since_step must be an int, got {since_step!r}")
    step = int(np.asarray(state["embedding"]["step"]))
    if since_step > step:
        raise UserInputError(
            f"delta export '{table}': since_step={since_step} is after the state's step {step}"
        )
    snap = dyn.snapshot(state)[table]
    changed = snap["last"] > since_step
    alive = set(names(snap["keys"]))
    return TableDelta(
        table=table,
        since_step=int(since_step),
        step=step,
        upsert_keys=snap["keys"][changed],
        upsert_rows=np.asarray(snap["rows"], np.float32)[changed],
        delete_names=sorted(set(exported) - alive),
        alive=len(alive),
    )


def apply_delta(
    delta: TableDelta,
    upsert_names: list[str],
    *,
    store=None,
    index=None,
    version: str,
    dims: int | None = None,
) -> None:
    """Writes ``delta`` (its upserts named ``upsert_names``, rows cut to the first ``dims``
    columns) to a KVStore (put under ``version``, delete) and/or a VectorIndex (upsert,
    delete). Idempotent: applying it twice leaves what applying it once leaves."""
    rows = delta.upsert_rows[:, :dims] if dims is not None else delta.upsert_rows
    if store is not None:
        if upsert_names:
            store.put(upsert_names, rows, version)
        store.delete(delta.delete_names)
    if index is not None:
        if upsert_names:
            index.upsert(upsert_names, rows)
        if delta.delete_names:
            index.delete(delta.delete_names, missing_ok=True)


def export_delta(
    dyn: DynamicTables,
    state: Mapping,
    table: str,
    *,
    since_step: int,
    store=None,
    index=None,
    version: str | None = None,
    names: Callable[[np.ndarray], list[str]] = decimal_names,
) -> DeltaCounts:
    """Applies ``table``'s increment since ``since_step`` to a KVStore (``store.put`` the
    upserts with ``version``, default "step-<step>"; ``store.delete`` the gone names)
    and/or a VectorIndex (``index.upsert`` / ``index.delete``); see module docstring."""
    if store is None and index is None:
        raise UserInputError("delta export: give a KV store (store=) or a vector index (index=)")
    exported = set(store.ids()) if store is not None else set()
    if index is not None:
        exported |= set(index.ids.tolist())
    delta = table_delta(dyn, state, table, since_step, exported, names)
    upsert_names = names(delta.upsert_keys)
    apply_delta(
        delta, upsert_names, store=store, index=index, version=version or f"step-{delta.step}"
    )
    return DeltaCounts(table, delta.step, len(upsert_names), len(delta.delete_names), delta.alive)
