"""table_wise_row_wise: rows split over one mesh axis, inside one group of devices.

The group is one index of the other axes (e.g. on a data=2 x model=4 mesh, group 1 with
axis "model" is devices 4..7). Route: ids all-gathered over all axes. Lookup: the
group's devices gather the rows they own. Combine: psum_scatter over all axes. Keeps a
big table's traffic inside one group (one host on real hardware).
"""

import numpy as np

from lf_jax.embedding.sharding.piece import Piece, split_rows


def place(table, entry, mesh):
    """Returns (all mesh axes, one piece over the group's devices along ``axis``)."""
    axes = tuple(mesh.axis_names)
    axis = entry["axis"]
    grid = np.arange(int(np.prod(list(mesh.shape.values())))).reshape(tuple(mesh.shape.values()))
    along = axes.index(axis)
    other_shape = tuple(size for name, size in mesh.shape.items() if name != axis)
    other_index = np.unravel_index(entry["group"], other_shape) if other_shape else ()
    index = list(other_index)
    index.insert(along, slice(None))
    slots = grid[tuple(index)]
    stride = int(slots[1] - slots[0]) if len(slots) > 1 else 1
    return axes, [
        Piece(
            table=table.name,
            col_start=0,
            col_end=table.dim,
            num_slots=len(slots),
            rows_per_slot=split_rows(table.vocab_size, len(slots)),
            slot0=int(slots[0]),
            slot_stride=stride,
        )
    ]
