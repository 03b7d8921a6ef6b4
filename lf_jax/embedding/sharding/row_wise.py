"""row_wise: rows split evenly over some mesh axes (all axes: every device).

Route: ids all-gathered over the row axes. Lookup: each shard gathers the rows it owns
(others contribute zeros). Combine: partial bags reduce-scattered (psum_scatter) back to
the batch owners. Replicated over the remaining axes. For the largest tables.
"""

import math

from lf_jax.embedding.sharding.piece import Piece, split_rows


def place(table, entry, mesh):
    """Returns (group mesh axes, pieces): one piece split over the row axes."""
    axes = tuple(entry["axes"])
    shards = math.prod(mesh.shape[axis] for axis in axes)
    return axes, [
        Piece(
            table=table.name,
            col_start=0,
            col_end=table.dim,
            num_slots=shards,
            rows_per_slot=split_rows(table.vocab_size, shards),
        )
    ]
