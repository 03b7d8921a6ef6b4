"""table_wise_row_wise: rows split over one mesh axis, inside one group of devices.

The group is one index of the other axes (e.g. on a data=2 x model=4 mesh, group 1 with
axis "model" is devices 4..7). Route: ids go to the owners in that group only
(all_to_all over all axes). Lookup: the group's devices gather the rows they own and
send them back; combine: local pooling. Keeps a big table inside one group (one host on
real hardware); the group serves the table's ids of the whole batch.
"""

import numpy as np

from lf_jax.embedding.sharding.piece import PlanError, device_count, split_rows, whole_table_piece

NAME = "table_wise_row_wise"


def table_wise_row_wise(group: int = 0, axis: str = "model") -> dict:
    """Plan entry: rows split over ``axis`` within ``group`` (an index of the other axes)."""
    return {"strategy": NAME, "group": group, "axis": axis}


def validate(table, entry: dict, mesh_shape) -> dict:
    """The axis must be a mesh axis and the group an index of the other axes."""
    axis = entry.get("axis", "model")
    if axis not in mesh_shape:
        raise PlanError(
            f"table '{table.name}': table_wise_row_wise axis {axis!r} is not a mesh "
            f"axis {tuple(mesh_shape)}"
        )
    groups = device_count(mesh_shape) // mesh_shape[axis]
    group = entry.get("group", 0)
    if not isinstance(group, int) or not 0 <= group < groups:
        raise PlanError(
            f"table '{table.name}': table_wise_row_wise group {group!r} is outside [0, {groups})"
        )
    return {**entry, "axis": axis, "group": group}


def place(table, entry, mesh_shape):
    """Returns (all mesh axes, one piece over the group's devices along ``axis``)."""
    axes, axis = tuple(mesh_shape), entry["axis"]
    grid = np.arange(device_count(mesh_shape)).reshape(tuple(mesh_shape.values()))
    other_shape = tuple(size for name, size in mesh_shape.items() if name != axis)
    index = list(np.unravel_index(entry["group"], other_shape)) if other_shape else []
    index.insert(axes.index(axis), slice(None))
    slots = grid[tuple(index)]
    stride = int(slots[1] - slots[0]) if len(slots) > 1 else 1
    return axes, [
        whole_table_piece(
            table,
            num_slots=len(slots),
            rows_per_slot=split_rows(table.vocab_size, len(slots)),
            slot0=int(slots[0]),
            slot_stride=stride,
        )
    ]


def label(entry) -> str:
    return f"{NAME}(group {entry['group']}, {entry['axis']})"
