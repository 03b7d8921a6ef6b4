"""Piece: where one column slice of a logical table lives in its shard group.

Row r of the piece lives in slot ``slot0 + (r % num_slots) * slot_stride`` at local row
``row_offset + r // num_slots`` (rows dealt round-robin, so hot low ids spread over
every owner); slots index the devices along the
group's mesh axes, row-major. ``slot0`` None means "place me" (table-wise, balanced
by the layout).

Also the vocabulary every strategy module shares: PlanError, and the mesh shape as an
ordered {axis: size} mapping (a Mesh, an AbstractMesh or a plain dict), so plans are
validated and laid out without devices.

Example:
    >>> Piece(table="member", col_start=0, col_end=64, num_slots=8, rows_per_slot=125_000)
"""

import dataclasses
import math
from collections.abc import Mapping

from lf_jax.errors import UserInputError


class PlanError(UserInputError):
    """A plan that names an unknown table or strategy, or does not fit the mesh."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Piece:
    table: str
    col_start: int
    col_end: int
    num_slots: int
    rows_per_slot: int
    slot0: int | None = 0
    slot_stride: int = 1
    row_offset: int = 0

    @property
    def dim(self) -> int:
        return self.col_end - self.col_start

    def slots(self) -> list[int]:
        assert self.slot0 is not None, "an unplaced piece has no slots yet"
        return [self.slot0 + i * self.slot_stride for i in range(self.num_slots)]


def whole_table_piece(table, *, num_slots: int, rows_per_slot: int, **placement) -> Piece:
    """A piece holding every column of ``table`` (placement: slot0, slot_stride)."""
    return Piece(
        table=table.name,
        col_start=0,
        col_end=table.dim,
        num_slots=num_slots,
        rows_per_slot=rows_per_slot,
        **placement,
    )


def split_rows(vocab_size: int, num_slots: int) -> int:
    """Rows per slot when ``vocab_size`` rows are split evenly (the last slot padded)."""
    return math.ceil(vocab_size / num_slots)


def mesh_shape_of(mesh) -> dict[str, int]:
    """{axis: size} in mesh order, from a Mesh, an AbstractMesh or a mapping."""
    shape = mesh.shape if hasattr(mesh, "axis_names") else mesh
    if not isinstance(shape, Mapping):
        raise TypeError(f"expected a mesh or an {{axis: size}} mapping, got {mesh!r}")
    return {str(name): int(size) for name, size in shape.items()}


def device_count(mesh_shape: Mapping[str, int]) -> int:
    """Devices in the mesh: table-wise placements index them row-major over all axes."""
    return math.prod(mesh_shape.values())
