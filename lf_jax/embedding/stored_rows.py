"""Logical table rows <-> a shard group's stored [S, R(, D)] array.

A piece of a table spread over S slots keeps logical row r on slot r % S at local row
r // S (rows dealt round-robin), in the row range [row_offset, row_offset + rows_per_slot)
of every slot it owns. ``place_rows`` builds a group's stored array from logical arrays,
``piece_rows`` reads each piece's logical rows back; both keep a table spread over the
whole group split over its devices (an all-to-all, never a gather onto one device), so
init, restore and ``EmbeddingCollection.to_logical`` work for tables larger than a device.

``stored_state`` and ``logical_state`` do it for a whole collection state (tables and
optimizer slots, EmbeddingCollection.from_logical / to_logical).

Shapes: V vocab rows, D dim, S slots of the group, R rows per slot.

Example:
    >>> stored_srd = place_rows(mesh, group, {"member": table_vd}, jnp.float32, with_dim=True)
    >>> [(piece, rows_vd)] = piece_rows(mesh, group, stored_srd, specs)
    >>> state = stored_state(mesh, groups, specs, {"member": table_vd}, None, step=0)
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from lf_jax.embedding.sharding.layout import Group
from lf_jax.embedding.sharding.piece import Piece
from lf_jax.embedding.spec import TableSpec


def place_rows(mesh: Mesh, group: Group, logical: Mapping, dtype, with_dim: bool) -> jax.Array:
    """Stored [S, R(, D)] array of ``group`` from logical arrays per table. Without
    ``with_dim`` (a row-wise slot) a logical [V, D] array gives each piece the column
    at its col_start; a [V] array gives every piece the same values."""
    trailing = (group.dim,) if with_dim else ()
    stored = jnp.zeros((group.num_slots, group.rows, *trailing), dtype)
    for piece in group.pieces:
        block = jnp.asarray(logical[piece.table]).astype(dtype)
        if with_dim:
            block = block[:, piece.col_start : piece.col_end]
        elif block.ndim == 2:
            block = block[:, piece.col_start]
        padded_rows = piece.num_slots * piece.rows_per_slot
        block = jnp.pad(block, [(0, padded_rows - block.shape[0])] + [(0, 0)] * len(trailing))
        # row r lives on slot r % num_slots at local row r // num_slots
        block = block.reshape(piece.rows_per_slot, piece.num_slots, *trailing)
        block = _swap_rows_and_slots(mesh, group, piece, block)
        stop = piece.slots()[-1] + 1
        stored = stored.at[
            piece.slot0 : stop : piece.slot_stride,
            piece.row_offset : piece.row_offset + piece.rows_per_slot,
        ].set(block)
    return stored


def piece_rows(
    mesh: Mesh, group: Group, stored, tables: Mapping[str, TableSpec]
) -> Iterator[tuple[Piece, jax.Array]]:
    """(piece, its logical [V(, ...)] rows) for every piece of ``group`` in ``stored``
    ([S, R, ...]), cut to the piece's table's vocab_size."""
    for piece in group.pieces:
        stop = piece.slots()[-1] + 1
        block = stored[
            piece.slot0 : stop : piece.slot_stride,
            piece.row_offset : piece.row_offset + piece.rows_per_slot,
        ]
        rows = _swap_rows_and_slots(mesh, group, piece, block)
        rows = rows.reshape(-1, *block.shape[2:])
        yield piece, rows[: tables[piece.table].vocab_size]


def _swap_rows_and_slots(mesh: Mesh, group: Group, piece: Piece, block: jax.Array) -> jax.Array:
    """[R, S, ...] logical order (row r at [r // S, r % S]) <-> [S, R, ...] stored order.
    For a piece spread over the whole group both sides stay split on their first axis
    over the group's devices, so XLA exchanges the rows all-to-all and never gathers a
    table on one device (init, restore and to_logical of tables larger than a device)."""
    if piece.num_slots == group.num_slots > 1:
        spec = NamedSharding(mesh, group.partition_spec(*([None] * (block.ndim - 1))))
        block = jax.lax.with_sharding_constraint(block, spec)
        return jax.lax.with_sharding_constraint(block.swapaxes(0, 1), spec)
    return block.swapaxes(0, 1)


def stored_state(
    mesh: Mesh,
    groups: Sequence[Group],
    tables: Mapping[str, TableSpec],
    logical_tables: Mapping,
    logical_slots: Mapping | None,
    step,
) -> dict:
    """The collection state {"tables": {group: [S, R, D]}, "slots": {group: {name: [S,
    R(, D)]}}, "step"} from logical [V, D] tables and slots per table (None: every slot
    at its optimizer's initial value)."""
    state: dict[str, Any] = {"tables": {}, "slots": {}, "step": jnp.asarray(step, jnp.int32)}
    for group in groups:
        dtype = jnp.dtype(group.dtype)
        state["tables"][group.name] = place_rows(mesh, group, logical_tables, dtype, with_dim=True)
        state["slots"][group.name] = {}
        for name, shape in group.optimizer.slot_shapes(group.dim).items():
            if logical_slots is None:
                init = group.optimizer.slot_init(name)
                source = {
                    p.table: jnp.full(
                        (tables[p.table].vocab_size, *([tables[p.table].dim] if shape else [])),
                        init,
                        jnp.float32,
                    )
                    for p in group.pieces
                }
            else:
                source = {
                    p.table: jnp.asarray(logical_slots[p.table][name], jnp.float32)
                    for p in group.pieces
                }
            state["slots"][group.name][name] = place_rows(
                mesh, group, source, jnp.float32, with_dim=bool(shape)
            )
    return state


def logical_state(
    mesh: Mesh, groups: Sequence[Group], tables: Mapping[str, TableSpec], state: Mapping
) -> dict:
    """Inverse of ``stored_state``: {"tables": {name: [V, D]}, "slots": {name: {slot: [V,
    D]}}, "step"}. A row-wise slot ([V] per piece, e.g. the Adagrad accumulator) comes
    out per column: each column holds the value of the piece that owns it."""
    table_parts: dict[str, list] = {}
    slot_parts: dict[str, dict[str, list]] = {}
    for group in groups:
        for piece, rows in piece_rows(mesh, group, state["tables"][group.name], tables):
            table_parts.setdefault(piece.table, []).append((piece.col_start, rows))
        for name, stored in state["slots"][group.name].items():
            for piece, rows in piece_rows(mesh, group, stored, tables):
                if rows.ndim == 1:  # one value per row of the piece: one per column
                    width = piece.col_end - piece.col_start
                    rows = jnp.broadcast_to(rows[:, None], (rows.shape[0], width))
                slot_parts.setdefault(piece.table, {}).setdefault(name, []).append(
                    (piece.col_start, rows)
                )

    def joined(parts):
        return jnp.concatenate([rows for _, rows in sorted(parts, key=lambda p: p[0])], axis=1)

    return {
        "tables": {name: joined(parts) for name, parts in table_parts.items()},
        "slots": {
            table: {name: joined(parts) for name, parts in by_slot.items()}
            for table, by_slot in slot_parts.items()
        },
        "step": state["step"],
    }
