"""Dynamic tables (64-bit keys in per-shard hash tables) inside ``lf_jax.Ranker``.

A Ranker whose ``TableSpec``s set ``dynamic=DynamicPolicy(...)`` (its own, or a
``dynamic=`` run of ``lf-jax train`` opened with ``Ranker.from_workdir``) keeps next to
its embedding state ``ranker.index``: per dynamic table the hash tables of
``lf_jax.embedding.dynamic.DynamicTables`` ({table: {"key_hi", "key_lo", "last",
"freq", "sketch", "counters"}}, each [S, ...] on the ranker's mesh). It moves in and out
in the form a trainer checkpoint holds: every table and the dynamic tables' optimizer
slots in the collection's logical form ([V, D]; a dynamic table's row of the key in slot
c of shard s is c * S + s) with the per-device hash tables [S, ...] as they are. Where
the ranker's shards match (same shard count and slots per shard, e.g. a (2, 4) run
opened on 8 devices on "data") they are placed unchanged, so a full table comes back
exactly; otherwise each key moves to its owner and window on the new shards
(``dynamic.checkpoint.rehash_logical``, as ``Checkpointer.restore(..., dynamic=)``
does; a key without a free slot there is one UserInputError naming the table).

A saved Ranker writes the logical tables to tables.npz (as a static one) and
dynamic.npz: ``step``, ``index/<table>/<field>`` [S, ...] and ``slots/<table>/<slot>``
(the dynamic tables' optimizer slots, logical; static tables' slots start fresh on
load, as for a static Ranker).

Predictions find keys as evaluation does (``resolve(insert=False)``: a key the tables do
not hold pools as padding); ``fit`` inserts, admits and evicts them as ``lf-jax train``
does (``train/dynamic_step.make_dynamic_train_step``).

Shapes: V rows (capacity) of a table, D its dim, S devices, C slots per shard.

Example:
    >>> state = dynamic_state(ranker)                    # {"embedding", "dynamic"}
    >>> save_dynamic(ranker, directory / "dynamic.npz")
    >>> load_dynamic(ranker, directory / "dynamic.npz", logical_tables)
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lf_jax.console import get_logger
from lf_jax.embedding.dynamic.checkpoint import rehash_logical
from lf_jax.embedding.dynamic.tables import DynamicTables, KeyBatch
from lf_jax.embedding.preprocess import SparseBatch
from lf_jax.errors import UserInputError


def fresh_state(collection, seed: int) -> tuple[DynamicTables | None, dict, dict | None]:
    """(DynamicTables or None, embedding state, hash tables or None) of a new Ranker's
    ``collection``: hash tables only where a table is dynamic."""
    if all(t.dynamic is None for t in collection.tables.values()):
        return None, collection.init(jax.random.key(seed)), None
    dynamic = DynamicTables(collection)
    both = dynamic.init(jax.random.key(seed))
    return dynamic, both["embedding"], both["index"]


def find_rows(ranker, batch: KeyBatch) -> SparseBatch:
    """The rows of a placed KeyBatch's keys that the tables hold (others padding):
    evaluation's ``resolve(insert=False)``, nothing inserted (jitted once per ranker)."""
    from lf_jax.train.dynamic_step import make_dynamic_resolve

    ranker._find = ranker._find or make_dynamic_resolve(ranker.dynamic)
    return ranker._find(dynamic_state(ranker), batch)


def dynamic_state(ranker) -> dict:
    """{"embedding": the ranker's embedding state, "dynamic": its hash tables}: the
    train state's form that ``make_dynamic_resolve`` and the train step read."""
    return {"embedding": ranker.embedding, "dynamic": ranker.index}


def place_logical(ranker, tables: Mapping, slots: Mapping, index: Mapping, step: int) -> None:
    """Sets ``ranker.embedding`` and ``ranker.index`` from logical ``tables`` and
    ``slots`` (every table, numpy [V, ...]) and per-device hash tables ``index``
    ({table: {field: [S_old, ...]}}) at ``step``: kept where their shapes are the
    ranker's, else rehashed onto its shards (see the module docstring)."""
    dyn = ranker.dynamic
    index = {n: {k: np.asarray(v) for k, v in part.items()} for n, part in index.items()}
    ours = jax.tree.map(np.shape, ranker.index)
    if jax.tree.map(np.shape, index) == ours:
        shardings = dyn.index_shardings()
        ranker.index = {
            n: {k: jax.device_put(v, shardings[n][k]) for k, v in part.items()}
            for n, part in index.items()
        }
    else:
        old = {n: part["last"].shape for n, part in index.items()}
        logical = {"tables": dict(tables), "slots": dict(slots), "step": step}
        moved, ranker.index = rehash_logical(dyn, logical, index)
        tables, slots = moved["tables"], moved["slots"]
        get_logger().info(
            "dynamic tables' keys of shards %s rehashed onto %s",
            old,
            {n: part["last"] for n, part in ours.items()},
        )
    ranker.embedding = ranker.collection.state_from_logical(tables, slots, step)


def save_dynamic(ranker, path: Path) -> None:
    """Writes dynamic.npz (see the module docstring) to ``path``."""
    host = jax.device_get(ranker.index)
    slots = ranker.collection.logical_slots(ranker.embedding)
    arrays: dict[str, Any] = {"step": np.asarray(int(ranker.embedding["step"]), np.int64)}
    for name in ranker.dynamic.specs:
        arrays.update({f"index/{name}/{k}": np.asarray(v) for k, v in host[name].items()})
        arrays.update({f"slots/{name}/{k}": np.asarray(v) for k, v in slots[name].items()})
    np.savez(path, **arrays)


def load_dynamic(ranker, path: Path, tables: Mapping[str, np.ndarray]) -> None:
    """Places ``save_dynamic``'s file with the saved logical ``tables`` (every table)
    on the ranker's mesh."""
    if not path.is_file():
        raise UserInputError(
            f"'{path.parent}' holds no {path.name}: its ranker.json names dynamic tables "
            f"{sorted(ranker.dynamic.specs)}, whose keys that file holds"
        )
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    slots = ranker.collection.logical_slots(ranker.embedding)  # static: fresh
    index = {}
    for name, fresh in jax.device_get(ranker.index).items():
        index[name] = {k: arrays.get(f"index/{name}/{k}") for k in fresh}
        slots[name] = {k: arrays.get(f"slots/{name}/{k}") for k in slots[name]}
        missing = [k for k, v in {**index[name], **slots[name]}.items() if v is None]
        if missing:
            raise UserInputError(f"'{path}' has no {missing} of dynamic table '{name}'")
    place_logical(ranker, tables, slots, index, int(arrays["step"]))
