"""table_wise: each whole table on one device; same-dim tables stacked in one array.

Route: ids go to the owning device only (all_to_all over all axes). Lookup: the owner
gathers rows and sends them back; combine: local pooling. The owner serves its table's
ids of the whole batch (inherent). Tables without a device are placed by the layout on
the least-loaded device, largest first.
"""

from lf_jax.embedding.sharding.piece import PlanError, device_count, whole_table_piece

NAME = "table_wise"


def table_wise(device: int | None = None) -> dict:
    """Plan entry: the whole table on ``device`` (None: placed by the layout)."""
    return {"strategy": NAME, "device": device}


def validate(table, entry: dict, mesh_shape) -> dict:
    """The device, when given, must index the mesh's devices."""
    device, count = entry.get("device"), device_count(mesh_shape)
    if device is not None and not (isinstance(device, int) and 0 <= device < count):
        raise PlanError(
            f"table '{table.name}': table_wise device {device!r} is outside [0, {count})"
        )
    return {**entry, "device": device}


def place(table, entry, mesh_shape):
    """Returns (all mesh axes, one piece on ``entry['device']`` or unplaced)."""
    return tuple(mesh_shape), [
        whole_table_piece(
            table,
            num_slots=1,
            rows_per_slot=table.vocab_size,
            slot0=entry.get("device"),
        )
    ]


def label(entry) -> str:
    return f"{NAME}(dev {entry['device']})"
