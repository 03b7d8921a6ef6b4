"""Cost model of a plan on a mesh: per-device bytes and communication bytes per step.

Pure Python/numpy: it never touches devices and never allocates a table. It mirrors
what the engine does (lf_jax/embedding/sharding/layout.py and lookup.py):

- Layout. Every table piece lands in a stacked group array [slots, rows, dim] keyed by
  (mesh axes, piece dim, dtype, optimizer). Each device holds one [rows, dim] slice of
  every group, where ``rows`` is the group's most-used slot: replicated groups
  (data_parallel) hold the sum of their tables' rows, row_wise groups the sum of
  ceil(vocab / shards), and all-axes groups (table_wise, column_wise pieces,
  table_wise_row_wise, row_wise over every axis) are padded to their fullest device.
  Allocated bytes per device are therefore the same on every device.
- Traffic. Per example a table is read through E id entries (sum of max_ids over the
  features reading it) and gives C output columns (1 per pooled feature, max_ids per
  sequence feature). Each entry travels as 12 bytes (owner slot, local row, coef).
- Forward, group of S devices (S = 1 replicated, |axes| row_wise, N otherwise): entries
  all-gathered over S, partial outputs [S*b, C, D] float32 psum_scatter'ed over S.
- Update: entries and output-column gradients [b, C, D] all-gathered over all N devices;
  every device dedupes and updates the rows it holds.

Communication counts bytes received per device per step with ring collectives:
all_gather of a b-sized chunk over S devices receives (S-1) chunks, psum_scatter of an
[S*b, ...] buffer receives (S-1)/S of it. Activation bytes are the peak of the forward
and update buffers plus the looked-up output (b = batch / N local examples).

Example:
    >>> traffic = Traffic.of("member", features)     # Traffic(entries=53, columns=4)
    >>> cost = step_cost(member, traffic, row_wise("model"), {"data": 8, "model": 8}, 16384)
    >>> format_bytes(cost.comm)
    '48.1 MB'
"""

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lf_jax.embedding.spec import FeatureSpec, TableSpec

ENTRY_BYTES = 12  # per id entry: owner slot (int32), local row (int32), coefficient (float32)
ACT_BYTES = 4  # activations and gradients are float32
UPDATE_COPIES = 3  # per-entry [B*E, D] buffers of the update: grads, deduped grads, rows


def format_bytes(count: float) -> str:
    """Human units, decimal (1 KB = 1000 B), three significant digits: '5.16 GB'."""
    if abs(count) < 1000:
        return f"{int(count)} B"
    for unit in ("KB", "MB", "GB"):
        count /= 1000
        if abs(count) < 999.5:
            return f"{count:.3g} {unit}"
    return f"{count / 1000:.3g} TB"


def table_bytes(table: TableSpec) -> int:
    """Weights plus optimizer slots of the whole logical table."""
    return table.vocab_size * (table.bytes_per_row + table.slot_bytes_per_row())


def slot_row_bytes(table: TableSpec, dim: int) -> int:
    """Optimizer-slot bytes of one row of a ``dim``-column piece (float32 slots)."""
    return 4 * sum(math.prod(shape) for shape in table.optimizer.slot_shapes(dim).values())


def piece_row_bytes(table: TableSpec, dim: int) -> int:
    """Bytes of one row of a ``dim``-column piece of ``table``: weights plus slots."""
    itemsize = 2 if table.dtype in ("bfloat16", "float16") else 4
    return dim * itemsize + slot_row_bytes(table, dim)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What one example asks of a table: E id entries and C output columns."""

    entries: int
    columns: int

    @classmethod
    def of(cls, table: str, features: Sequence[FeatureSpec]) -> "Traffic":
        reading = [f for f in features if f.table == table]
        return cls(
            entries=sum(f.max_ids for f in reading),
            columns=sum(1 if f.pooled else f.max_ids for f in reading),
        )


def all_axes(mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    return tuple(mesh_shape)


def num_devices(mesh_shape: Mapping[str, int]) -> int:
    return math.prod(mesh_shape.values())


@dataclasses.dataclass(frozen=True)
class Piece:
    """A column slice placed over ``num_slots`` slots of its group (slot0 None: auto)."""

    table: str
    dim: int
    col_start: int
    axes: tuple[str, ...]
    num_slots: int
    rows_per_slot: int
    slot0: int | None = 0
    stride: int = 1

    def slots(self) -> list[int]:
        assert self.slot0 is not None, f"piece of '{self.table}' is not placed yet"
        return [self.slot0 + i * self.stride for i in range(self.num_slots)]


def pieces_of(table: TableSpec, entry: Mapping, mesh_shape: Mapping[str, int]) -> list[Piece]:
    """The pieces a (validated) plan entry makes of ``table``, as the engine places them."""
    kind, every = entry["strategy"], all_axes(mesh_shape)
    whole: dict[str, Any] = dict(table=table.name, dim=table.dim, col_start=0)
    if kind == "data_parallel":
        return [Piece(**whole, axes=(), num_slots=1, rows_per_slot=table.vocab_size)]
    if kind == "row_wise":
        axes = tuple(a for a in every if a in entry["axes"])
        shards = math.prod(mesh_shape[a] for a in axes)
        return [
            Piece(
                **whole,
                axes=axes,
                num_slots=shards,
                rows_per_slot=math.ceil(table.vocab_size / shards),
            )
        ]
    if kind == "table_wise":
        return [
            Piece(
                **whole,
                axes=every,
                num_slots=1,
                rows_per_slot=table.vocab_size,
                slot0=entry.get("device"),
            )
        ]
    if kind == "column_wise":
        width = table.dim // entry["num_shards"]
        return [
            Piece(
                table=table.name,
                dim=width,
                col_start=i * width,
                axes=every,
                num_slots=1,
                rows_per_slot=table.vocab_size,
                slot0=None,
            )
            for i in range(entry["num_shards"])
        ]
    if kind == "table_wise_row_wise":
        axis = entry["axis"]
        grid = np.arange(num_devices(mesh_shape)).reshape(tuple(mesh_shape.values()))
        other = tuple(size for name, size in mesh_shape.items() if name != axis)
        index = list(np.unravel_index(entry["group"], other)) if other else []
        index.insert(every.index(axis), slice(None))
        slots = grid[tuple(index)]
        stride = int(slots[1] - slots[0]) if len(slots) > 1 else 1
        return [
            Piece(
                **whole,
                axes=every,
                num_slots=len(slots),
                rows_per_slot=math.ceil(table.vocab_size / len(slots)),
                slot0=int(slots[0]),
                stride=stride,
            )
        ]
    raise ValueError(f"unknown strategy {kind!r}")


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Per-device bytes one step costs a table: traffic and activation peak."""

    forward_comm: int
    update_comm: int
    activation: int

    @property
    def comm(self) -> int:
        return self.forward_comm + self.update_comm


def step_cost(
    table: TableSpec,
    traffic: Traffic,
    entry: Mapping,
    mesh_shape: Mapping[str, int],
    batch_size: int,
) -> StepCost:
    """Forward + update communication and activation bytes per device for one table."""
    n = num_devices(mesh_shape)
    b = batch_size // n
    e, c = traffic.entries, traffic.columns
    fwd_comm = upd_comm = fwd_act = upd_act = out = 0
    for piece in pieces_of(table, entry, mesh_shape):
        s = math.prod(mesh_shape[a] for a in piece.axes)
        d = piece.dim
        slot_bytes = slot_row_bytes(table, d)
        fwd_comm += (s - 1) * b * (e * ENTRY_BYTES + c * d * ACT_BYTES)
        upd_comm += (n - 1) * b * (e * ENTRY_BYTES + c * d * ACT_BYTES)
        fwd_act += s * b * e * (ENTRY_BYTES + d * ACT_BYTES) + (
            s * b * c * d * ACT_BYTES if s > 1 else 0
        )
        upd_act += batch_size * (
            e * (ENTRY_BYTES + UPDATE_COPIES * d * ACT_BYTES + slot_bytes) + c * d * ACT_BYTES
        )
        out += b * c * d * ACT_BYTES
    return StepCost(
        forward_comm=fwd_comm, update_comm=upd_comm, activation=max(fwd_act, upd_act) + out
    )


@dataclasses.dataclass
class Group:
    """One stacked array: rows used on each of its slots, bytes per row."""

    axes: tuple[str, ...]
    dim: int
    row_bytes: int
    used: np.ndarray  # [num_slots] rows used per slot
    pieces: list[Piece] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return max(int(self.used.max()), 1)


@dataclasses.dataclass
class Layout:
    """Where every piece of a plan lives; all per-device figures in bytes."""

    mesh_shape: dict[str, int]
    groups: list[Group]
    by_key: dict = dataclasses.field(default_factory=dict, repr=False)  # group key -> Group

    def allocated_per_device(self) -> int:
        """Weights + slots every device allocates (same on all devices: padded groups)."""
        return sum(g.rows * g.row_bytes for g in self.groups)

    def used_per_device(self) -> np.ndarray:
        """[N] bytes of real rows on each device (row-major device index over all axes)."""
        n = num_devices(self.mesh_shape)
        used = np.zeros(n, np.int64)
        for group in self.groups:
            used += group.used[self._slot_of_device(group.axes)] * group.row_bytes
        return used

    def table_per_device(self, table: str) -> np.ndarray:
        """[N] bytes of ``table``'s rows held on each device."""
        held = np.zeros(num_devices(self.mesh_shape), np.int64)
        for group in self.groups:
            rows = np.zeros(len(group.used), np.int64)
            for piece in group.pieces:
                if piece.table == table:
                    rows[piece.slots()] += piece.rows_per_slot
            held += rows[self._slot_of_device(group.axes)] * group.row_bytes
        return held

    def devices_of(self, table: str) -> list[int]:
        """Slots (devices) of the table's all-axes pieces, in piece order."""
        return [
            s
            for g in self.groups
            if g.axes == all_axes(self.mesh_shape)
            for p in g.pieces
            if p.table == table
            for s in p.slots()
        ]

    def stack_for(self, table: TableSpec, dim: int | None = None) -> Group | None:
        """The all-axes group a table-wise piece of ``table`` would join, if it exists."""
        key = self._key(all_axes(self.mesh_shape), dim or table.dim, table)
        return self.by_key.get(key)

    def _slot_of_device(self, axes: tuple[str, ...]) -> np.ndarray:
        grid = np.indices(tuple(self.mesh_shape.values())).reshape(len(self.mesh_shape), -1)
        slot = np.zeros(grid.shape[1], np.int64)
        for position, (name, size) in enumerate(self.mesh_shape.items()):
            if name in axes:
                slot = slot * size + grid[position]
        return slot

    @staticmethod
    def _key(axes, dim, table):
        """The engine's group key: pieces sharing it share one stored array."""
        return (axes, dim, table.dtype, table.optimizer)


def simulate_layout(
    tables: Sequence[TableSpec], plan: Mapping[str, Mapping], mesh_shape: Mapping[str, int]
) -> Layout:
    """The engine's layout of ``plan`` (tables in order; entries validated).

    Fixed pieces are placed first in table order, then auto-placed column pieces
    largest first on the least-loaded device not holding the same table, exactly like
    lf_jax.embedding.sharding.layout.build_layout.
    """
    mesh_shape, every = dict(mesh_shape), all_axes(mesh_shape)
    keyed: dict[tuple, list[tuple[TableSpec, Piece]]] = defaultdict(list)
    for table in tables:
        if table.name in plan:
            for piece in pieces_of(table, plan[table.name], mesh_shape):
                keyed[Layout._key(piece.axes, piece.dim, table)].append((table, piece))
    layout = Layout(mesh_shape=mesh_shape, groups=[])
    device_load: dict[int, int] = defaultdict(int)
    for key, members in keyed.items():
        axes, dim = key[0], key[1]
        num_slots = math.prod(mesh_shape[a] for a in axes)
        group = Group(
            axes=axes,
            dim=dim,
            row_bytes=piece_row_bytes(members[0][0], dim),
            used=np.zeros(num_slots, np.int64),
        )
        fixed = [p for _, p in members if p.slot0 is not None]
        auto = sorted(
            (p for _, p in members if p.slot0 is None),
            key=lambda p: (-p.rows_per_slot * p.dim, p.table, p.col_start),
        )
        for piece in fixed + auto:
            if piece.slot0 is None:
                holding = {s for q in group.pieces if q.table == piece.table for s in q.slots()}
                free = [s for s in range(num_slots) if s not in holding] or list(range(num_slots))
                piece = dataclasses.replace(
                    piece, slot0=min(free, key=lambda s: (device_load[s], s))
                )
            slots = piece.slots()
            offset = int(group.used[slots].max())
            group.used[slots] = offset + piece.rows_per_slot
            if axes == every:
                for slot in slots:
                    device_load[slot] += piece.rows_per_slot * piece.dim
            group.pieces.append(piece)
        layout.groups.append(group)
        layout.by_key[key] = group
    return layout
