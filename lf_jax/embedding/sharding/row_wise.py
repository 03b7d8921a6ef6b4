"""row_wise: rows split evenly over some mesh axes (all axes: every device).

Route: each device sends its deduplicated ids to the owners along the row axes
(all_to_all). Lookup: owners gather the rows and send them back. Combine: each device
pools its own bags. Replicated over the remaining axes (their owners sync gradients
with an all-gather over those axes). For the largest tables.
"""

import math

from lf_jax.embedding.sharding.piece import PlanError, split_rows, whole_table_piece

NAME = "row_wise"


def row_wise(axes: str | tuple[str, ...] = ("model",)) -> dict:
    """Plan entry: rows split over ``axes`` (all mesh axes: every device)."""
    return {"strategy": NAME, "axes": (axes,) if isinstance(axes, str) else tuple(axes)}


def validate(table, entry: dict, mesh_shape) -> dict:
    """Axes must be mesh axes; they are put in mesh order."""
    axes = entry.get("axes", ("model",))
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [axis for axis in axes if axis not in mesh_shape]
    if bad or not axes:
        raise PlanError(
            f"table '{table.name}': row_wise axes {axes} are not mesh axes {tuple(mesh_shape)}"
        )
    return {**entry, "axes": tuple(axis for axis in mesh_shape if axis in axes)}


def place(table, entry, mesh_shape):
    """Returns (group mesh axes, pieces): one piece split over the row axes."""
    axes = tuple(entry["axes"])
    shards = math.prod(mesh_shape[axis] for axis in axes)
    return axes, [
        whole_table_piece(
            table,
            num_slots=shards,
            rows_per_slot=split_rows(table.vocab_size, shards),
        )
    ]


def label(entry) -> str:
    return f"{NAME}({','.join(entry['axes'])})"
