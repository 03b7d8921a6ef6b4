"""Sharding plans: plain dicts mapping each table name to a strategy dict.

A plan is written by hand or emitted by the planner (lf_jax.planner), and can be
saved as JSON. Strategy helpers build the dicts:

    data_parallel()                      replicated on every device
    table_wise(device=None)              whole table on one device (auto-placed if None)
    row_wise(axes=("model",))            rows split over mesh axes (all axes: every device)
    column_wise(num_shards)              dim split into num_shards pieces, placed table-wise
    table_wise_row_wise(group=0, axis="model")
                                         rows split over ``axis`` within one group
                                         (one index of the other mesh axes)

Example:
    >>> plan = {"member": row_wise(), "hashtag": table_wise(), "position": data_parallel()}
    >>> validate_plan(plan, tables_by_name, mesh)
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jax.sharding import AbstractMesh, Mesh

from lf_jax.errors import UserInputError

STRATEGIES = ("data_parallel", "table_wise", "row_wise", "column_wise", "table_wise_row_wise")


class PlanError(UserInputError):
    """A plan that names an unknown table or strategy, or does not fit the mesh."""


def data_parallel() -> dict:
    return {"strategy": "data_parallel"}


def table_wise(device: int | None = None) -> dict:
    return {"strategy": "table_wise", "device": device}


def row_wise(axes: str | tuple[str, ...] = ("model",)) -> dict:
    return {"strategy": "row_wise", "axes": (axes,) if isinstance(axes, str) else tuple(axes)}


def column_wise(num_shards: int) -> dict:
    return {"strategy": "column_wise", "num_shards": num_shards}


def table_wise_row_wise(group: int = 0, axis: str = "model") -> dict:
    return {"strategy": "table_wise_row_wise", "group": group, "axis": axis}


def num_slots(mesh: Mesh | AbstractMesh) -> int:
    """Devices in the mesh: table-wise placements index them row-major over all axes."""
    return math.prod(mesh.shape.values())


def validate_plan(
    plan: Mapping[str, Mapping[str, Any]], tables: Mapping[str, Any], mesh: Mesh | AbstractMesh
) -> dict[str, dict]:
    """Checks a plan against tables and mesh; returns it normalised (tuples, defaults).

    Every table needs an entry; unknown tables, strategies, axes and shard counts raise
    PlanError naming the table and the bad value.
    """
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
        entry = dict(entry)
        kind = entry.get("strategy")
        table = tables[name]
        if kind not in STRATEGIES:
            raise PlanError(
                f"table '{name}': strategy {kind!r} is unknown; choose one of {STRATEGIES}"
            )
        if kind == "row_wise":
            axes = entry.get("axes", ("model",))
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            bad = [axis for axis in axes if axis not in mesh.shape]
            if bad or not axes:
                raise PlanError(
                    f"table '{name}': row_wise axes {axes} are not mesh axes {tuple(mesh.shape)}"
                )
            entry["axes"] = tuple(axis for axis in mesh.axis_names if axis in axes)
        elif kind == "table_wise":
            device = entry.get("device")
            if device is not None and not (
                isinstance(device, int) and 0 <= device < num_slots(mesh)
            ):
                raise PlanError(
                    f"table '{name}': table_wise device {device!r} is outside "
                    f"[0, {num_slots(mesh)})"
                )
            entry["device"] = device
        elif kind == "column_wise":
            shards = entry.get("num_shards")
            if not isinstance(shards, int) or shards < 1 or table.dim % shards:
                raise PlanError(
                    f"table '{name}': column_wise num_shards {shards!r} must be a "
                    f"positive divisor of dim {table.dim}"
                )
            if shards > num_slots(mesh):
                raise PlanError(
                    f"table '{name}': column_wise num_shards {shards} exceeds the "
                    f"{num_slots(mesh)} devices"
                )
        elif kind == "table_wise_row_wise":
            axis = entry.get("axis", "model")
            if axis not in mesh.shape:
                raise PlanError(
                    f"table '{name}': table_wise_row_wise axis {axis!r} is not a mesh "
                    f"axis {tuple(mesh.shape)}"
                )
            groups = num_slots(mesh) // mesh.shape[axis]
            group = entry.get("group", 0)
            if not isinstance(group, int) or not 0 <= group < groups:
                raise PlanError(
                    f"table '{name}': table_wise_row_wise group {group!r} is outside [0, {groups})"
                )
            entry["axis"], entry["group"] = axis, group
        normalised[name] = entry
    return normalised


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
