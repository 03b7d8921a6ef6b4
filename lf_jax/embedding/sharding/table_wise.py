"""table_wise: each whole table on one device; same-dim tables stacked in one array.

Route: ids all-gathered over all axes. Lookup: the owning device gathers rows.
Combine: psum_scatter over all axes. Tables without a device are placed by the layout
on the least-loaded device, largest first.
"""

from lf_jax.embedding.sharding.piece import Piece


def place(table, entry, mesh):
    """Returns (all mesh axes, one piece on ``entry['device']`` or unplaced)."""
    return tuple(mesh.axis_names), [
        Piece(
            table=table.name,
            col_start=0,
            col_end=table.dim,
            num_slots=1,
            rows_per_slot=table.vocab_size,
            slot0=entry.get("device"),
        )
    ]
