"""column_wise(num_shards): the dim split into num_shards column pieces.

Each piece is placed table-wise on a different device; a feature's output concatenates
the pieces' outputs along dim. Route/lookup/combine as table_wise. For wide tables whose
rows are too large for one device but whose row count is modest.
"""

from lf_jax.embedding.sharding.piece import Piece


def place(table, entry, mesh):
    """Returns (all mesh axes, num_shards unplaced pieces of dim/num_shards columns)."""
    shards = entry["num_shards"]
    width = table.dim // shards
    return tuple(mesh.axis_names), [
        Piece(
            table=table.name,
            col_start=i * width,
            col_end=(i + 1) * width,
            num_slots=1,
            rows_per_slot=table.vocab_size,
            slot0=None,
        )
        for i in range(shards)
    ]
