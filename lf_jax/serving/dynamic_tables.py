"""Serving tables of a feed ranker trained with dynamic tables (lf_jax.embedding.dynamic).

A dynamic table holds 64-bit keys (the feed ranker's ids are its keys: member 42 is key
42) in per-shard hash tables; a key it does not hold (never admitted, refused, evicted,
expired) reads nothing in training: it pools as padding (left out of a mean, zero for a
single id). ``served_dynamic_tables`` turns each dynamic table of a restored checkpoint
into what the served functions read (lf_jax.serving.functions.served_ids):

* a compacted row table [n + 1, D]: the rows of the table's alive keys that are ids of
  the dataset (keys below its id count), in ascending key order, then one zero row (so a
  table that holds no such key still has a row to gather; never read with a weight);
* ``key_rows`` int32 [V]: id -> its row in that table, -1 (padding) for an id the table
  does not hold; V is the dataset's id count of the table (num_members, num_posts, ...).

The feature store keeps ids (history actors, authors); ``served_ids`` maps them through
``key_rows`` inside the exported functions, and the artifact's string id maps keep naming
the store's and the post cache's rows ("p<i>" is row i), so the server is unchanged.
``host_ids`` gives the export's holdout check the same ids: rows of static tables (the
collection's preprocessing), ids of dynamic ones (the keys training resolves).

Shapes: V ids of a table, n served keys, D dim, B batch, L max_ids.

Example:
    >>> served = served_dynamic_tables(source)          # a restored RankerCorpus
    >>> served.tables["post"].shape, served.key_rows["post"].shape   # (n + 1, 16), (1000,)
    >>> served.summary["post"]     # {"ids": 1000, "alive_keys": ..., "served_keys": ...}
"""

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from lf_jax.embedding.dynamic.keys import join_keys
from lf_jax.errors import UserInputError


class ServedDynamicTables(NamedTuple):
    """Per dynamic table: the compacted rows [n + 1, D], key_rows [V], a summary dict."""

    tables: dict[str, np.ndarray]
    key_rows: dict[str, np.ndarray]
    summary: dict[str, dict]


def check_servable(tables) -> None:
    """A dynamic table whose ids the dataset does not count (only member, post, hashtag
    and position ids are counted) is an error naming it: its ids cannot be mapped to
    rows. Reads names only (``lf-jax export --serving`` checks before any device work)."""
    from lf_jax.train.ranker_model import VOCAB_OF_TABLE

    for table in tables:
        if table not in VOCAB_OF_TABLE:
            raise UserInputError(
                f"config embedding.tables.{table}.dynamic: --serving maps the dataset's ids "
                f"of a dynamic table to its rows, and the dataset counts the ids of "
                f"{sorted(VOCAB_OF_TABLE)} only; make '{table}' static for a serving export"
            )


def id_counts(tables, meta: Mapping) -> dict[str, int]:
    """{dynamic table: the dataset's id count V} (its ids are 0..V-1; ``check_servable``)."""
    from lf_jax.train.ranker_model import VOCAB_OF_TABLE

    check_servable(tables)
    return {table: int(meta[VOCAB_OF_TABLE[table]]) for table in tables}


def served_dynamic_tables(source) -> ServedDynamicTables:
    """The served form of every dynamic table of ``source`` (a restored
    ``corpus_sources.RankerCorpus``), see the module docstring."""
    dyn = source.dynamic
    counts = id_counts(sorted(dyn.specs), source.model.meta)
    snapshot = dyn.snapshot(source.table_state())
    tables, key_rows, summary = {}, {}, {}
    for name, count in counts.items():
        keys = np.asarray(snapshot[name]["keys"], np.uint64)
        rows = np.asarray(snapshot[name]["rows"], np.float32)
        served = keys < np.uint64(count)
        n = int(served.sum())
        rows_v = np.full(count, -1, np.int32)
        rows_v[keys[served].astype(np.int64)] = np.arange(n, dtype=np.int32)
        tables[name] = np.concatenate([rows[served], np.zeros((1, rows.shape[1]), np.float32)])
        key_rows[name] = rows_v
        summary[name] = {
            "ids": count,
            "capacity": int(dyn.collection.tables[name].vocab_size),
            "alive_keys": int(keys.size),
            "served_keys": n,
            "keys_beyond_ids": int(keys.size - n),
        }
    return ServedDynamicTables(tables, key_rows, summary)


def host_ids(model, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{feature: int32 [B, L]} (-1 padded) of a host batch ``raw`` ({feature: ids}) for
    ``functions.ranker_probs``: rows of static tables (``collection.preprocess``); for a
    model with dynamic tables, their features' ids as training resolves them (bags
    truncated to max_ids, -1 padded; a key beyond int32 is left out: no served table
    holds it)."""
    if model.dynamic is None:
        return dict(model.collection.preprocess(raw).ids)
    batch = model.dynamic.preprocess(raw)
    out = dict(batch.static.ids)
    for name in batch.hi:
        keys = join_keys(batch.hi[name], batch.lo[name])
        keep = batch.valid[name] & (keys < np.uint64(2**31))
        out[name] = np.where(keep, keys, np.uint64(0)).astype(np.int64)
        out[name] = np.where(keep, out[name], -1).astype(np.int32)
    return out
