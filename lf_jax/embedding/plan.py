"""Sharding plans: plain dicts mapping each table name to a strategy dict.

A plan is written by hand or emitted by the planner (lf_jax.planner), and can be
saved as JSON. Each strategy module (lf_jax.embedding.sharding) has its constructor:

    data_parallel()                      replicated on every device
    table_wise(device=None)              whole table on one device (auto-placed if None)
    row_wise(axes=("model",))            rows split over mesh axes (all axes: every device)
    column_wise(num_shards)              dim split into num_shards pieces, placed table-wise
    table_wise_row_wise(group=0, axis="model")
                                         rows split over ``axis`` within one group
                                         (one index of the other mesh axes)

Example:
    >>> from lf_jax import embedding as emb
    >>> plan = {"member": emb.row_wise(), "hashtag": emb.table_wise(),
    ...         "position": emb.data_parallel()}
    >>> validate_plan(plan, tables_by_name, mesh)        # a Mesh or {"data": 2, "model": 4}
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lf_jax.embedding.sharding import STRATEGY_MODULES
from lf_jax.embedding.sharding.piece import PlanError, mesh_shape_of

STRATEGIES = tuple(STRATEGY_MODULES)


def validate_plan(
    plan: Mapping[str, Mapping[str, Any]], tables: Mapping[str, Any], mesh
) -> dict[str, dict]:
    """Checks a plan against tables and mesh; returns it normalised (tuples, defaults).

    ``mesh`` is a Mesh, an AbstractMesh or an {axis: size} mapping. Every table needs an
    entry; unknown tables, strategies, axes and shard counts raise PlanError naming the
    table and the bad value (each strategy module checks its own options).
    """
    mesh_shape = mesh_shape_of(mesh)
    missing = sorted(set(tables) - set(plan))
    if missing:
        raise PlanError(f"plan has no strategy for table(s) {missing}")
    unknown = sorted(set(plan) - set(tables))
    if unknown:
        raise PlanError(f"plan names unknown table(s) {unknown} (tables: {sorted(tables)})")
    normalised = {}
    for name, entry in plan.items():
        if not isinstance(entry, Mapping):
            raise PlanError(
                f"table '{name}': plan entry must be a strategy dict such as "
                f"row_wise(), got {entry!r}"
            )
        kind = entry.get("strategy")
        if kind not in STRATEGY_MODULES:
            raise PlanError(
                f"table '{name}': strategy {kind!r} is unknown; choose one of {STRATEGIES}"
            )
        normalised[name] = STRATEGY_MODULES[kind].validate(tables[name], dict(entry), mesh_shape)
    return normalised


def strategy_label(entry: Mapping) -> str:
    """Short text for a validated plan entry: 'row_wise(model)', 'table_wise(dev 3)', ..."""
    return STRATEGY_MODULES[entry["strategy"]].label(entry)


def save_plan(plan: Mapping[str, Mapping], path: str | Path) -> None:
    """Writes a plan as JSON."""
    Path(path).write_text(
        json.dumps({k: dict(v) for k, v in plan.items()}, indent=2, sort_keys=True)
    )


def load_plan(path: str | Path) -> dict[str, dict]:
    """Reads a JSON plan written by save_plan (tuples come back as lists; validate_plan
    normalises them)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"plan file '{path}' is not valid JSON: {error}") from None
