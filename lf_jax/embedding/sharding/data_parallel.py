"""data_parallel: the whole table replicated on every device.

Route: nothing (every device owns every row). Lookup: local gather. Combine: nothing.
Update: ids and row gradients are all-gathered so every replica applies the same
sparse update. Best for small tables read by many features.
"""

from lf_jax.embedding.sharding.piece import Piece


def place(table, entry, mesh) -> tuple[tuple[str, ...], list[Piece]]:
    """Returns (group mesh axes, pieces): no axes, one piece holding every row."""
    return (), [
        Piece(
            table=table.name,
            col_start=0,
            col_end=table.dim,
            num_slots=1,
            rows_per_slot=table.vocab_size,
        )
    ]
