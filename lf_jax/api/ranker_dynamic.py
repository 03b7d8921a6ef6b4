"""Dynamic tables (64-bit keys in per-shard hash tables) inside ``lf_jax.Ranker``.

A Ranker whose ``TableSpec``s set ``dynamic=DynamicPolicy(...)`` (its own, or a
``dynamic=`` run of ``lf-jax train`` opened with ``Ranker.from_workdir``) keeps next to
its embedding state ``ranker.index``: per dynamic table the hash tables of
``lf_jax.embedding.dynamic.DynamicTables`` ({table: {"key_hi", "key_lo", "last",
"freq", "sketch", "counters"}}, each [S, ...] on the ranker's mesh). This module moves
that state between the Ranker and its two mesh-free forms:

- a checkpoint's content (``dynamic.checkpoint.to_checkpoint``: static tables and
  slots, per dynamic table its alive keys with rows, optimizer slots, ``last``,
  ``freq``, the summed sketch and counters, and the step), placed on the ranker's mesh
  with ``from_checkpoint`` (each key to its owner and window there);
- ``dynamic.npz`` of a saved Ranker: that content for the dynamic tables, flattened to
  npz keys ``<table>/<field>`` and ``<table>/slots/<slot>``, plus ``step``.

Predictions find keys as evaluation does (``resolve(insert=False)``: a key the tables do
not hold pools as padding); ``fit`` inserts, admits and evicts them as ``lf-jax train``
does (``train/dynamic_step.make_dynamic_train_step``).

Shapes: K alive keys of a table, D its dim, S devices.

Example:
    >>> state = dynamic_state(ranker)                    # {"embedding", "dynamic"}
    >>> save_dynamic(ranker, directory / "dynamic.npz")
    >>> load_dynamic(ranker, directory / "dynamic.npz", static_tables)
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lf_jax.embedding.dynamic.checkpoint import from_checkpoint, to_checkpoint
from lf_jax.errors import UserInputError

FIELDS = ("keys", "rows", "last", "freq", "sketch", "counters")


def dynamic_state(ranker) -> dict:
    """{"embedding": the ranker's embedding state, "dynamic": its hash tables}: the
    train state's form that ``make_dynamic_resolve`` and the train step read."""
    return {"embedding": ranker.embedding, "dynamic": ranker.index}


def place_checkpoint(ranker, ckpt: Mapping) -> None:
    """Sets ``ranker.embedding`` and ``ranker.index`` from ``to_checkpoint`` content of
    any mesh: keys rehashed onto the ranker's shards (a key without a free slot there is
    one UserInputError naming the table)."""
    placed = from_checkpoint(ranker.dynamic, ckpt)
    ranker.embedding, ranker.index = placed["embedding"], placed["index"]


def checkpoint_of(dynamic, state: Mapping) -> dict:
    """``to_checkpoint`` content of a train state with ``state["dynamic"]`` (a trainer
    checkpoint restored with ``Checkpointer.restore(..., dynamic=)``)."""
    return to_checkpoint(dynamic, {"embedding": state["embedding"], "index": state["dynamic"]})


def save_dynamic(ranker, path: Path) -> None:
    """Writes the dynamic tables' content (mesh-free, see the module docstring) to ``path``."""
    ckpt = to_checkpoint(ranker.dynamic, {"embedding": ranker.embedding, "index": ranker.index})
    arrays: dict[str, Any] = {"step": np.asarray(ckpt["step"], np.int64)}
    for name, part in ckpt["dynamic"].items():
        arrays.update({f"{name}/{field}": np.asarray(part[field]) for field in FIELDS})
        arrays.update({f"{name}/slots/{k}": np.asarray(v) for k, v in part["slots"].items()})
    np.savez(path, **arrays)


def load_dynamic(ranker, path: Path, static_tables: Mapping[str, np.ndarray]) -> None:
    """Places ``save_dynamic``'s file and the saved logical ``static_tables`` on the
    ranker's mesh (static tables' optimizer slots start fresh, as ``Ranker.load``'s)."""
    if not path.is_file():
        raise UserInputError(
            f"'{path.parent}' holds no {path.name}: its ranker.json names dynamic tables "
            f"{sorted(ranker.dynamic.specs)}, whose keys and rows that file holds"
        )
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    dynamic = {}
    for name in ranker.dynamic.specs:
        missing = [f for f in FIELDS if f"{name}/{f}" not in arrays]
        if missing:
            raise UserInputError(f"'{path}' has no {missing} of dynamic table '{name}'")
        part: dict[str, Any] = {field: arrays[f"{name}/{field}"] for field in FIELDS}
        prefix = f"{name}/slots/"
        part["slots"] = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        dynamic[name] = part
    fresh_slots = ranker.collection.logical_slots(ranker.embedding)
    static = {
        "tables": {n: v for n, v in static_tables.items() if n not in ranker.dynamic.specs},
        "slots": {n: v for n, v in fresh_slots.items() if n not in ranker.dynamic.specs},
    }
    place_checkpoint(ranker, {"static": static, "dynamic": dynamic, "step": int(arrays["step"])})
