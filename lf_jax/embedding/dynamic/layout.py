"""TableLayout: which devices hold a dynamic table's shards, and where a key's row lives.

A dynamic table is planned ``row_wise`` over every mesh axis (its S shards are the S
devices) or ``table_wise_row_wise`` (its shards are the devices of one group along one
mesh axis, e.g. devices 4..7 of a data=2 x model=4 mesh for group 1 of "model"). Either
way the table is one Piece of a group stored over every device, and:

* shard j of the table lives on device ``devices[j]``, with ``capacity = vocab_size //
  shards`` slots;
* key k belongs to shard ``owner(k) = key_hash(k, OWNER) % shards``;
* the key in slot c of its shard is logical row ``c * shards + owner(k)`` of the table
  (row r lives on shard r % shards at local row ``piece.row_offset + r // shards``, the
  static engine's placement).

The per-device hash tables (``DynamicTables.init``'s "index") keep one shard per device
of the mesh; devices outside a table_wise_row_wise group hold an empty one (same shape,
never written), so jit sees one sharding for every table's index.

Example:
    >>> layout = table_layout(collection, "post")      # table_wise_row_wise(1, "model")
    >>> layout.devices, layout.capacity
    ((4, 5, 6, 7), 1024)
    >>> rows = layout.logical_rows(keys_u64, slots)     # [K] rows of the logical table
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

from lf_jax.embedding.dynamic.keys import OWNER_SALT, key_hash, salt, split_keys
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.sharding import STRATEGY_MODULES
from lf_jax.embedding.sharding.layout import Group
from lf_jax.embedding.sharding.piece import Piece, PlanError, mesh_shape_of
from lf_jax.embedding.spec import SpecError, TableSpec

PLACEMENTS = ("row_wise", "table_wise_row_wise")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableLayout:
    """One dynamic table's shards (see module docstring)."""

    spec: TableSpec
    group: Group
    piece: Piece
    devices: tuple[int, ...]

    @property
    def policy(self) -> DynamicPolicy:
        assert self.spec.dynamic is not None
        return self.spec.dynamic

    @property
    def shards(self) -> int:
        return len(self.devices)

    @property
    def capacity(self) -> int:
        """Slots (keys) per shard."""
        return self.spec.vocab_size // self.shards

    def owners(self, keys_u64: np.ndarray) -> np.ndarray:
        """[K] int64 shard (0 .. shards-1) owning each uint64 key."""
        return key_owners(keys_u64, self.shards, self.policy.seed)

    def logical_rows(self, keys_u64: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """[K] logical row of each key held in slot ``slots`` [K] of its owner."""
        return np.asarray(slots, np.int64) * self.shards + self.owners(keys_u64)


def key_owners(keys_u64: np.ndarray, shards: int, seed: int) -> np.ndarray:
    """[K] int64 owner shard ``key_hash(k, OWNER) % shards`` of uint64 keys [K] (numpy)."""
    hi, lo = split_keys(np.asarray(keys_u64, np.uint64))
    return (key_hash(np, hi, lo, salt(OWNER_SALT, seed)) % np.uint32(shards)).astype(np.int64)


def table_shards(tables: Mapping[str, TableSpec], plan: Mapping, mesh) -> dict[str, int]:
    """{dynamic table: its shard count} under a validated ``plan`` on ``mesh`` (a Mesh or
    an {axis: size} mapping; no devices needed: ``lf-jax plan`` reports with it)."""
    mesh_shape = mesh_shape_of(mesh)
    out = {}
    for name, spec in tables.items():
        if spec.dynamic is None or name not in plan:
            continue
        _, pieces = STRATEGY_MODULES[plan[name]["strategy"]].place(spec, plan[name], mesh_shape)
        out[name] = pieces[0].num_slots
    return out


def table_layout(collection, name: str) -> TableLayout:
    """The layout of dynamic table ``name`` of an EmbeddingCollection; PlanError or
    SpecError naming the table when its plan or capacity does not fit."""
    spec = collection.tables[name]
    entry = collection.plan[name]
    group, piece = next((g, p) for g in collection.groups for p in g.pieces if p.table == name)
    axes = tuple(collection.mesh.axis_names)
    whole = entry["strategy"] == "table_wise_row_wise" or piece.num_slots == collection.num_devices
    if entry["strategy"] not in PLACEMENTS or group.axes != axes or not whole:
        raise PlanError(
            f"dynamic table '{name}': plan it row_wise over every mesh axis {axes} or "
            f"table_wise_row_wise, got {entry!r}"
        )
    if spec.vocab_size % piece.num_slots:
        raise SpecError(
            f"dynamic table '{name}': vocab_size {spec.vocab_size} (its row capacity) must "
            f"divide over its {piece.num_slots} shards ({entry['strategy']})"
        )
    return TableLayout(spec=spec, group=group, piece=piece, devices=tuple(piece.slots()))
