"""``train.warm_start`` from a static run into a config with dynamic tables.

A static run's checkpoint holds every table in its logical form [V, D] and no hash
tables. A run whose id tables are dynamic starts from it so:

- params, and the tables that are static in both runs (with their optimizer slots), are
  taken as they are (``ranker_specs`` sizes static tables as the snapshot's);
- each dynamic table takes the static table's row r as key r (the ranker's ids are its
  keys) for every row but the last, the OOV row, with its optimizer slots (a slot the
  static optimizer lacks starts from its initial value). Keys are placed as a restore
  places them (lf_jax.embedding.dynamic.warm_start: ascending, each in the first free
  slot of its window), stamped with the snapshot's step. When the capacity is below the
  rows, the rows whose window is already full are not carried: one warning names the
  table and how many; those ids get fresh rows when training sees them (and admits them);
- the dense optimizer restarts and the embedding step continues from the snapshot's, as
  in every warm start (lf_jax.train.loop).

Example:
    >>> if is_static_checkpoint(source, step, task.dynamic):
    ...     state = warm_start_from_static(task.dynamic, state, source, step)
"""

from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.console import get_logger
from lf_jax.embedding.dynamic.checkpoint import fitting_keys
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.dynamic.warm_start import warm_start
from lf_jax.errors import UserInputError
from lf_jax.train.checkpoint import Checkpointer, unflatten_like


def _stored(source: Checkpointer, step: int, item: str) -> dict:
    meta = source.manager.item_metadata(step)[item]
    return dict(getattr(meta, "tree", meta))


def is_static_checkpoint(source: Checkpointer, step: int, dyn: DynamicTables) -> bool:
    """Whether ``step`` of ``source`` holds none of ``dyn``'s hash tables (a static run)."""
    stored = _stored(source, step, "state")
    return not any(key.startswith(f"dynamic.{name}.") for name in dyn.specs for key in stored)


def warm_start_from_static(
    dyn: DynamicTables, state: Mapping, source: Checkpointer, step: int
) -> dict:
    """``state`` (a fresh train state of ``dyn``'s model) with params and tables from
    ``step`` of a static run's ``source`` (see module docstring)."""
    where = f"train.warm_start='{source.directory.parent}'"
    replicated = NamedSharding(dyn.mesh, PartitionSpec())
    abstract = {
        item: {
            key: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=replicated)
            for key, meta in _stored(source, step, item).items()
        }
        for item in ("state", "embedding")
    }
    restored = source.manager.restore(
        step,
        args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}),
    )
    dense, saved = jax.device_get(restored["state"]), jax.device_get(restored["embedding"])
    params = {k[len("params.") :]: v for k, v in dense.items() if k.startswith("params.")}
    coll = dyn.collection
    logical = jax.device_get(jax.jit(coll.to_logical)(state["embedding"]))
    tables, slots = dict(logical["tables"]), {n: dict(v) for n, v in logical["slots"].items()}
    for name in coll.tables:
        if f"tables.{name}" not in saved:
            raise UserInputError(f"{where} has no table '{name}' (its step {step})")
        rows = np.asarray(saved[f"tables.{name}"])
        if name in dyn.specs or rows.shape == tables[name].shape:
            continue
        raise UserInputError(
            f"{where}: table '{name}' is {list(rows.shape)} in the snapshot but "
            f"{list(tables[name].shape)} in the config"
        )
    for name in set(coll.tables) - set(dyn.specs):
        tables[name] = saved[f"tables.{name}"]
        for slot in slots.get(name, {}):
            if f"slots.{name}.{slot}" in saved:
                slots[name][slot] = saved[f"slots.{name}.{slot}"]
    both = {
        "embedding": coll.state_from_logical(tables, slots, int(saved["step"])),
        "index": state["dynamic"],
    }
    for name, spec in dyn.specs.items():
        rows = np.asarray(saved[f"tables.{name}"])[:-1]  # the last row is the OOV row
        keys = np.arange(rows.shape[0], dtype=np.uint64)
        fit = fitting_keys(dyn, name, keys)
        given = {}
        for slot, shape in spec.optimizer.slot_shapes(spec.dim).items():
            if f"slots.{name}.{slot}" in saved:  # logical slots are [V, D]; row-wise: [K]
                value = np.asarray(saved[f"slots.{name}.{slot}"])[:-1][fit]
                given[slot] = value if shape else value[:, 0]
        both = warm_start(dyn, both, name, keys[fit], rows[fit], given)
        if not fit.all():
            get_logger().warning(
                "warm start: dynamic table %s holds %d of the snapshot's %d rows (%d slots); "
                "the other %d ids start from fresh rows when training admits them",
                name,
                int(fit.sum()),
                fit.size,
                spec.vocab_size,
                int((~fit).sum()),
            )
    return {
        **state,
        "params": unflatten_like(state["params"], params),
        "embedding": both["embedding"],
        "dynamic": both["index"],
    }
