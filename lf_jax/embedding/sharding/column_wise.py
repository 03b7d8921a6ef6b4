"""column_wise(num_shards): the dim split into num_shards column pieces.

Each piece is placed table-wise on a different device; a feature's output concatenates
the pieces' outputs along dim. Route/lookup/combine as table_wise, once per piece. For
wide tables whose rows are too large for one device but whose row count is modest.
"""

from lf_jax.embedding.sharding.piece import Piece, PlanError, device_count

NAME = "column_wise"


def column_wise(num_shards: int) -> dict:
    """Plan entry: ``num_shards`` column pieces, each placed table-wise."""
    return {"strategy": NAME, "num_shards": num_shards}


def validate(table, entry: dict, mesh_shape) -> dict:
    """num_shards must divide dim and not exceed the devices."""
    shards = entry.get("num_shards")
    if not isinstance(shards, int) or shards < 1 or table.dim % shards:
        raise PlanError(
            f"table '{table.name}': column_wise num_shards {shards!r} must be a "
            f"positive divisor of dim {table.dim}"
        )
    if shards > device_count(mesh_shape):
        raise PlanError(
            f"table '{table.name}': column_wise num_shards {shards} exceeds the "
            f"{device_count(mesh_shape)} devices"
        )
    return entry


def place(table, entry, mesh_shape):
    """Returns (all mesh axes, num_shards unplaced pieces of dim/num_shards columns)."""
    shards = entry["num_shards"]
    width = table.dim // shards
    return tuple(mesh_shape), [
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


def label(entry) -> str:
    return f"{NAME}({entry['num_shards']})"
