"""data_parallel: the whole table replicated on every device.

Route: nothing (every device owns every row). Lookup: local gather. Combine: nothing.
Update: each device's deduplicated row gradients are all-gathered so every replica
applies the same sparse update (inherent: O(global batch) per device). Best for small
tables read by many features.
"""

from lf_jax.embedding.sharding.piece import Piece, whole_table_piece

NAME = "data_parallel"


def data_parallel() -> dict:
    """Plan entry: replicated on every device."""
    return {"strategy": NAME}


def validate(table, entry: dict, mesh_shape) -> dict:
    """No options."""
    return entry


def place(table, entry, mesh_shape) -> tuple[tuple[str, ...], list[Piece]]:
    """Returns (group mesh axes, pieces): no axes, one piece holding every row."""
    return (), [
        whole_table_piece(
            table,
            num_slots=1,
            rows_per_slot=table.vocab_size,
        )
    ]


def label(entry) -> str:
    return NAME
