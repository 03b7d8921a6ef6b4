"""Warm start on a new data window: keep the snapshot's tables, send new ids to OOV rows.

Incremental training restores a snapshot (params, tables, slots) and trains on newer
logs. Ids that appeared since the snapshot have no row in its tables; until the
vocabulary is rebuilt (a run without warm start), each table's last row - reserved as
its OOV row, never a real id (the ranker checks ``ids < vocab_size - 1``) - takes them.

Example:
    >>> tables, features, notes = snapshot_vocabulary(tables, features, "runs/window1",
    ...                                               {"member": 1_200})
    >>> notes[0]
    "member: ids >= 1000 (200 new since the snapshot) -> OOV row 1000 until the vocabulary is "
    "rebuilt"
"""

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from lf_jax.configuration import load_workdir_config
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError
from lf_jax.workdir import reject_remote


def snapshot_table_rows(warm_start: str | Path) -> dict[str, int]:
    """{table: vocab_size} of the run in ``warm_start`` (from its config.json)."""
    reject_remote(warm_start, "train.warm_start")
    config = load_workdir_config(
        warm_start, "train.warm_start", "is it the workdir of a finished run?"
    )
    try:
        tables = config.embedding.tables
        return {name: int(spec["vocab_size"]) for name, spec in tables.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise UserInputError(
            f"train.warm_start='{warm_start}': config.json has no readable "
            f"embedding.tables ({error})"
        ) from None


def snapshot_vocabulary(
    tables: Sequence[TableSpec],
    features: Sequence[FeatureSpec],
    warm_start: str | Path,
    entities: Mapping[str, int],
) -> tuple[list[TableSpec], list[FeatureSpec], list[str]]:
    """Tables sized as in the snapshot; features of tables whose data outgrew the snapshot
    send ids >= rows - 1 to the OOV row rows - 1. Dynamic tables keep the config's
    capacity (lf_jax.train.dynamic_warm_start carries a static snapshot's rows into them).

    ``entities``: {table: number of ids in the new data window}. Returns the new specs and
    one readable line per table whose ids are remapped.
    """
    rows = snapshot_table_rows(warm_start)
    missing = sorted(t.name for t in tables if t.name not in rows)
    if missing:
        raise UserInputError(
            f"train.warm_start='{warm_start}' has no table(s) {missing}; its tables: {sorted(rows)}"
        )
    new_tables, remapped, notes = [], {}, []
    for table in tables:
        if table.dynamic is not None:  # a capacity of keys: the config's, ids never remapped
            new_tables.append(table)
            continue
        snapshot_rows = rows[table.name]
        new_tables.append(dataclasses.replace(table, vocab_size=snapshot_rows))
        count = int(entities.get(table.name, 0))
        oov_row = snapshot_rows - 1
        if count > oov_row:
            remapped[table.name] = oov_row
            notes.append(
                f"{table.name}: ids >= {oov_row} ({count - oov_row} new since the snapshot) "
                f"-> OOV row {oov_row} until the vocabulary is rebuilt"
            )
    new_features = [
        dataclasses.replace(f, oov_row=remapped[f.table]) if f.table in remapped else f
        for f in features
    ]
    return new_tables, new_features, notes
