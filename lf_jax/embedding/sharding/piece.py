"""Piece: where one column slice of a logical table lives in its shard group.

Row r of the piece lives in slot ``slot0 + (r // rows_per_slot) * slot_stride`` at
local row ``row_offset + r % rows_per_slot``; slots index the devices along the
group's mesh axes, row-major. ``slot0`` None means "place me" (table-wise, balanced
by the layout).

Example:
    >>> Piece(table="member", col_start=0, col_end=64, num_slots=8, rows_per_slot=125_000)
"""

import dataclasses
import math


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
        assert self.slot0 is not None, f"piece of '{self.table}' is not placed yet"
        return [self.slot0 + i * self.slot_stride for i in range(self.num_slots)]


def split_rows(vocab_size: int, num_slots: int) -> int:
    """Rows per slot when ``vocab_size`` rows are split evenly (the last slot padded)."""
    return math.ceil(vocab_size / num_slots)
