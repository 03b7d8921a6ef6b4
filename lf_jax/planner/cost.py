"""Cost model of a plan on a mesh: per-device bytes and exchange bytes per step.

Pure Python/numpy over the engine's own code: the layout is
lf_jax.embedding.sharding.layout.build_layout run on a mesh shape (no devices), and a
group's traffic comes from lf_jax.embedding.lookup.GroupRoute (entries per example,
output columns, the largest owner share) and lf_jax.embedding.exchange.capacity_for.

- Layout. Every table piece lands in a stacked group array [slots, rows, dim]. Each
  device holds one [rows, dim] slice of every group, where ``rows`` is the group's
  most-used slot; allocated bytes per device are the same on every device.
- Exchange (per device and step, M = local entries of a group = b x E, S owners along
  the group's axes, R = N / S replicas, K = S x C with C = capacity_for(M, share,
  rows per slot): the static capacity for padded entries, an upper bound: capacities
  sized from the traffic, lf_jax.embedding.capacity, only shrink K at run time):
  forward: ids out and rows back through all_to_all, (S-1)/S x K x (4 + 4 D) bytes
  received; update: the unique rows' gradients to their owners (the owners kept the
  forward's ids), (S-1)/S x K x 4 D, plus (R-1) x K x (4 + 4 D) for the replicas'
  all-gather of ids and gradients (data_parallel: S = 1, R = N),
  or, for a replicated group where it is fewer bytes (long bags), (R-1) x the device's
  entries (12 bytes each) and output gradients (replicas_gather_entries, the engine's
  own rule).
- Bag mode (``EmbeddingCollection(exchange="bags" | "auto")``, lf_jax.embedding.bag_exchange)
  for a table whose rows spread over every device (no replicas): (S-1)/S x S x (Ce x 12
  + Cb x 8 D), Ce and Cb from ``bag_exchange.capacities_for`` (uniform ids: each id its
  own row). ``lf-jax plan`` shows it beside the rows exchange; ``auto`` picks from the
  traffic by the same bytes (``bag_exchange.bag_bytes`` < ``rows_bytes``).
- Activations (XLA temporaries): the dedupe's int32 buffers (6 M), the unique rows or
  gradients [U, D], the sent and received [K, D] buffers, the owner's R x K rows
  (gradients, weights, slots and their sort), and the [b, C, D] output; the peak of
  forward and update. Checked against XLA's memory_analysis() by bench/plan_vs_xla.py.

Example:
    >>> layout = Layout.of(tables, plan, {"data": 8, "model": 8})
    >>> cost = plan_step_cost(layout, features, batch_size=65_536)
    >>> format_bytes(cost.comm)
    '48.1 MB'
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from lf_jax.embedding import bag_exchange
from lf_jax.embedding.exchange import capacity_for, replicas_gather_entries, unique_size
from lf_jax.embedding.lookup import GroupRoute
from lf_jax.embedding.sharding.layout import Group, build_layout
from lf_jax.embedding.spec import FeatureSpec, TableSpec

ID_BYTES = 4  # an id (local row) travels as int32
ACT_BYTES = 4  # rows, activations and gradients are float32 in the step
DEDUPE_INTS = 6  # int32 buffers per entry of a dedupe: keys, sorted, flags, targets, ...


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


def slot_row_bytes(optimizer, dim: int) -> int:
    """Optimizer-slot bytes of one row of a ``dim``-column piece (float32 slots)."""
    return 4 * sum(math.prod(shape) for shape in optimizer.slot_shapes(dim).values())


def group_row_bytes(group: Group) -> int:
    """Bytes of one stored row of a group: weights plus optimizer slots."""
    itemsize = 2 if group.dtype in ("bfloat16", "float16") else 4
    return group.dim * itemsize + slot_row_bytes(group.optimizer, group.dim)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Per-device bytes one step costs: exchange received and activation peak."""

    forward_comm: int
    update_comm: int
    activation: int

    @property
    def comm(self) -> int:
        return self.forward_comm + self.update_comm

    def __add__(self, other: "StepCost") -> "StepCost":
        return StepCost(
            self.forward_comm + other.forward_comm,
            self.update_comm + other.update_comm,
            self.activation + other.activation,
        )


def exchange_cost(
    *,
    entries: int,
    columns: int,
    dim: int,
    num_slots: int,
    rows: int,
    share: float,
    replicas: int,
    slot_bytes: int,
) -> StepCost:
    """Per-device cost of one group's lookup + update (see the module docstring).

    entries: local entries M; columns: local output columns (b x C); rows: rows per
    slot of the group; share: the largest fraction of a device's entries one owner is
    expected to receive.
    """
    if num_slots == 1 and replicas > 1 and replicas_gather_entries(entries, columns, dim, rows):
        return _gathered_entries_cost(entries, columns, dim, rows, replicas, slot_bytes)
    capacity = capacity_for(entries, share, rows)
    k = num_slots * capacity
    row = ID_BYTES + dim * ACT_BYTES
    hop = (num_slots - 1) / num_slots
    forward_comm = int(hop * k * row)
    update_comm = int(hop * k * dim * ACT_BYTES) + (replicas - 1) * k * row
    dedupe = DEDUPE_INTS * entries * ID_BYTES
    unique = unique_size(entries, num_slots, rows) * dim * ACT_BYTES
    sent = k * dim * ACT_BYTES if num_slots > 1 else 0  # the all_to_all's outgoing rows
    received = replicas * k * dim * ACT_BYTES  # at the owner (gathered over replicas)
    output = columns * dim * ACT_BYTES
    # the owner's dedupe of what it received: summed gradients, rows, slots, sort ints
    owner = replicas * k * (dim * ACT_BYTES + slot_bytes + DEDUPE_INTS * ID_BYTES)
    if replicas > 1:  # the all-gather keeps the received copy beside the gathered one
        owner += replicas * k * dim * ACT_BYTES
    forward = dedupe + unique + sent + k * dim * ACT_BYTES + output
    update = dedupe + unique + sent + received + owner
    return StepCost(forward_comm, update_comm, max(forward, update))


def _gathered_entries_cost(entries, columns, dim, rows, replicas, slot_bytes) -> StepCost:
    """A replicated group that all-gathers entries and output gradients in the update."""
    gathered = replicas * (entries * (12 + DEDUPE_INTS * ID_BYTES) + columns * dim * ACT_BYTES)
    per_entry = replicas * entries * dim * ACT_BYTES  # coef x gradient of each entry
    unique = unique_size(replicas * entries, 1, rows)
    update = gathered + per_entry + unique * (3 * dim * ACT_BYTES + slot_bytes)
    forward = DEDUPE_INTS * entries * ID_BYTES + 2 * min(entries, rows) * dim * ACT_BYTES
    forward += columns * dim * ACT_BYTES
    update_comm = (replicas - 1) * (entries * 12 + columns * dim * ACT_BYTES)
    return StepCost(0, update_comm, max(forward, update))


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


def num_devices(mesh_shape: Mapping[str, int]) -> int:
    return math.prod(mesh_shape.values())


@dataclasses.dataclass
class Layout:
    """The engine's groups for a plan on a mesh shape; all per-device figures in bytes."""

    mesh_shape: dict[str, int]
    groups: list[Group]

    @classmethod
    def of(
        cls, tables: Sequence[TableSpec], plan: Mapping[str, Mapping], mesh_shape: Mapping
    ) -> "Layout":
        """Lays out the tables ``plan`` names (entries validated), exactly as the engine."""
        mesh_shape = dict(mesh_shape)
        return cls(mesh_shape, build_layout({t.name: t for t in tables}, plan, mesh_shape))

    def allocated_per_device(self) -> int:
        """Weights + slots every device allocates (same on all devices: padded groups)."""
        return sum(g.rows * group_row_bytes(g) for g in self.groups)

    def used_per_device(self) -> np.ndarray:
        """[N] bytes of real rows on each device (row-major device index over all axes)."""
        used = np.zeros(num_devices(self.mesh_shape), np.int64)
        for group in self.groups:
            rows = np.asarray(group.used_rows(), np.int64)
            used += rows[self._slot_of_device(group.axes)] * group_row_bytes(group)
        return used

    def table_per_device(self, table: str) -> np.ndarray:
        """[N] bytes of ``table``'s rows held on each device."""
        held = np.zeros(num_devices(self.mesh_shape), np.int64)
        for group in self.groups:
            rows = np.zeros(group.num_slots, np.int64)
            for piece in group.pieces:
                if piece.table == table:
                    rows[piece.slots()] += piece.rows_per_slot
            held += rows[self._slot_of_device(group.axes)] * group_row_bytes(group)
        return held

    def devices_of(self, table: str) -> list[int]:
        """Slots (devices) of the table's all-axes pieces, in piece order."""
        every = tuple(self.mesh_shape)
        return [
            s
            for g in self.groups
            if g.axes == every
            for p in g.pieces
            if p.table == table
            for s in p.slots()
        ]

    def stack_for(self, table: TableSpec, dim: int | None = None) -> Group | None:
        """The all-axes group a table-wise piece of ``table`` would join, if it exists."""
        every, dim = tuple(self.mesh_shape), dim or table.dim
        for group in self.groups:
            key = (group.axes, group.dim, group.dtype, group.optimizer)
            if key == (every, dim, table.dtype, table.optimizer):
                return group
        return None

    def _slot_of_device(self, axes: tuple[str, ...]) -> np.ndarray:
        grid = np.indices(tuple(self.mesh_shape.values())).reshape(len(self.mesh_shape), -1)
        slot = np.zeros(grid.shape[1], np.int64)
        for position, (name, size) in enumerate(self.mesh_shape.items()):
            if name in axes:
                slot = slot * size + grid[position]
        return slot


def group_step_cost(
    group: Group, features: Sequence[FeatureSpec], mesh_shape: Mapping, batch_size: int
) -> StepCost:
    """Exchange and activation bytes per device of one group's lookup + update; the
    activations include the group's outputs and their gradients, which live from the
    lookup to the update."""
    route = GroupRoute.build(group, {f.name: f for f in features})
    if not route.blocks:
        return StepCost(0, 0, 0)
    b = batch_size // num_devices(mesh_shape)
    entries = sum(block.max_ids for block in route.blocks)
    cost = exchange_cost(
        entries=b * entries,
        columns=b * route.num_out,
        dim=group.dim,
        num_slots=group.num_slots,
        rows=group.rows,
        share=route.owner_share,
        replicas=num_devices(mesh_shape) // group.num_slots,
        slot_bytes=slot_row_bytes(group.optimizer, group.dim),
    )
    outputs = 2 * b * route.num_out * group.dim * ACT_BYTES
    return cost + StepCost(0, 0, outputs)


def plan_step_cost(layout: Layout, features: Sequence[FeatureSpec], batch_size: int) -> StepCost:
    """The whole plan's step: exchange bytes and activations add up over groups (XLA
    does not reliably reuse one group's update buffers for another's)."""
    total = StepCost(0, 0, 0)
    for group in layout.groups:
        total = total + group_step_cost(group, features, layout.mesh_shape, batch_size)
    return total


def table_step_cost(
    table: TableSpec, layout: Layout, features: Sequence[FeatureSpec], batch_size: int
) -> StepCost:
    """One table's share, priced as if its pieces were alone in their groups."""
    traffic = Traffic.of(table.name, features)
    b = batch_size // num_devices(layout.mesh_shape)
    n = num_devices(layout.mesh_shape)
    total = StepCost(0, 0, 0)
    for group in layout.groups:
        for piece in group.pieces:
            if piece.table != table.name:
                continue
            total = total + exchange_cost(
                entries=b * traffic.entries,
                columns=b * traffic.columns,
                dim=piece.dim,
                num_slots=group.num_slots,
                rows=piece.rows_per_slot,
                share=1 / piece.num_slots,
                replicas=n // group.num_slots,
                slot_bytes=slot_row_bytes(table.optimizer, piece.dim),
            )
    return total


def table_bag_comm(
    table: TableSpec, layout: Layout, features: Sequence[FeatureSpec], batch_size: int
) -> int | None:
    """Bytes a device receives per step if ``table`` exchanged bags (bag mode), priced
    like ``table_step_cost`` (its pieces as if alone in their groups, uniform ids); None
    where bag mode does not apply (a piece with replicas, or rows on one device)."""
    traffic = Traffic.of(table.name, features)
    n = num_devices(layout.mesh_shape)
    b = batch_size // n
    total = 0
    for group in layout.groups:
        for piece in group.pieces:
            if piece.table != table.name:
                continue
            if group.num_slots != n or n == 1 or traffic.entries == 0:
                return None
            ce, cb = bag_exchange.capacities_for(
                b, traffic.entries, 1.0, 1 / piece.num_slots, traffic.columns
            )
            hop = (group.num_slots - 1) / group.num_slots
            total += int(hop * group.num_slots * bag_exchange.bag_bytes(ce, cb, piece.dim))
    return total
