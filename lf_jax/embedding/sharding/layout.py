"""Layout: the stored arrays (shard groups) that hold every table piece of a plan.

A Group is one array [num_slots, rows, dim] sharded on its first axis over ``axes``
(replicated when ``axes`` is empty), holding pieces of equal dim, dtype and optimizer.

Example:
    >>> groups = build_layout(tables_by_name, validate_plan(plan, tables_by_name, mesh), mesh)
    >>> [(g.name, g.shape) for g in groups]
    [('rw_model_d16', (4, 250, 16)), ('tw_d16', (8, 1000, 16))]
"""

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lf_jax.embedding.sharding import STRATEGY_MODULES
from lf_jax.embedding.sharding.piece import Piece, mesh_shape_of
from lf_jax.embedding.sparse_optim import SparseOptimizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Group:
    name: str
    axes: tuple[str, ...]
    num_slots: int
    rows: int
    dim: int
    dtype: str
    optimizer: SparseOptimizer
    pieces: tuple[Piece, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_slots, self.rows, self.dim)

    def partition_spec(self, *trailing) -> PartitionSpec:
        first = None if not self.axes else self.axes[0] if len(self.axes) == 1 else self.axes
        return PartitionSpec(first, *trailing)

    def used_rows(self) -> list[int]:
        """[num_slots] rows in use on each slot (below them a slot holds only padding)."""
        used = [0] * self.num_slots
        for piece in self.pieces:
            for slot in piece.slots():
                used[slot] = max(used[slot], piece.row_offset + piece.rows_per_slot)
        return used

    def replica_axes(self, mesh: Mesh) -> tuple[str, ...]:
        """The mesh axes over which this group's rows are replicated (axes of size 1
        hold no other replica)."""
        return tuple(a for a in mesh.axis_names if a not in self.axes and mesh.shape[a] > 1)

    def sharding(self, mesh: Mesh, extra_dims: int = 1) -> NamedSharding:
        """Sharding of the table (extra_dims=1) or of a row-wise slot (extra_dims=0)."""
        return NamedSharding(mesh, self.partition_spec(None, *([None] * extra_dims)))


def _group_name(axes, dim, dtype, optimizer, taken) -> str:
    where = "rep" if not axes else "_".join(axes)
    base = f"{where}_d{dim}_{dtype}_{optimizer.kind}"
    name, index = base, 1
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    return name


def build_layout(tables: Mapping, plan: Mapping[str, Mapping], mesh) -> list[Group]:
    """Places every table piece; ``plan`` must come from validate_plan.

    ``mesh`` is a Mesh or an {axis: size} mapping: the layout needs no devices, so the
    planner prices exactly what the engine allocates. Tables named in ``tables`` but not
    in ``plan`` are skipped (the planner lays out partial plans).
    """
    mesh_shape = mesh_shape_of(mesh)
    keyed: dict[tuple, list[Piece]] = defaultdict(list)
    for name, table in tables.items():
        if name not in plan:
            continue
        entry = plan[name]
        axes, pieces = STRATEGY_MODULES[entry["strategy"]].place(table, entry, mesh_shape)
        for piece in pieces:
            keyed[(axes, piece.dim, table.dtype, table.optimizer)].append(piece)
    device_load: defaultdict[int, int] = defaultdict(int)  # bytes per all-axes slot (balancing)
    groups: list[Group] = []
    taken: set[str] = set()
    all_axes = tuple(mesh_shape)
    for (axes, dim, dtype, optimizer), pieces in keyed.items():
        num_slots = math.prod(mesh_shape[axis] for axis in axes)
        used = [0] * num_slots
        placed: list[Piece] = []
        fixed = [p for p in pieces if p.slot0 is not None]
        auto = sorted(
            (p for p in pieces if p.slot0 is None),
            key=lambda p: (-p.rows_per_slot * p.dim, p.table, p.col_start),
        )
        for piece in fixed + auto:
            if piece.slot0 is None:
                holding = {s for q in placed if q.table == piece.table for s in q.slots()}
                candidates = [s for s in range(num_slots) if s not in holding] or list(
                    range(num_slots)
                )
                piece = dataclasses.replace(
                    piece, slot0=min(candidates, key=lambda s: (device_load[s], s))
                )
            slots = piece.slots()
            offset = max(used[s] for s in slots)
            piece = dataclasses.replace(piece, row_offset=offset)
            for slot in slots:
                used[slot] = offset + piece.rows_per_slot
                if axes == all_axes:
                    device_load[slot] += piece.rows_per_slot * piece.dim
            placed.append(piece)
        name = _group_name(axes, dim, dtype, optimizer, taken)
        taken.add(name)
        groups.append(
            Group(
                name=name,
                axes=axes,
                num_slots=num_slots,
                rows=max(max(used), 1),
                dim=dim,
                dtype=dtype,
                optimizer=optimizer,
                pieces=tuple(placed),
            )
        )
    return groups
