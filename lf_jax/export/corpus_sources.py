"""Corpus sources for ``lf-jax export``: one small class per model family.

Each class builds its family's model from the config (``RankerModel``,
``DualEncoderModel``: no training task, nothing written), restores the checkpoint onto the
mesh and implements the CorpusSource protocol of embed_corpus.py (entities, dims, corpus,
embed). A new family is one such class plus ``corpus=`` in lf_jax/train/families.py.

  * RankerCorpus (feed_ranker): members and posts are rows of the ranker's member and
    post id tables, looked up on the mesh through the embedding collection (the tables
    stay sharded as planned); ids "m<id>" and "p<id>" like the dual encoder's. A dynamic
    table (lf_jax.embedding.dynamic) exports its live keys: ids "m<key>" / "p<key>" in
    ascending key order, rows from ``DynamicTables.snapshot`` (hash tables restored, and
    rehashed when the checkpoint was written on another device count or placement).
  * DualEncoderCorpus (dual_encoder): members and items through the trained tiny Llama
    (``DualEncoderModel.corpus`` / ``embed``), unit-norm rows, cosine.

Example:
    >>> source = RankerCorpus(config, "runs/ranker_tiny", step=None)   # latest checkpoint
    >>> ids, records = source.corpus("posts")        # ["p0", ...], int ids [N]
    >>> source.embed("posts", records[:256]).shape   # (256, 16), the post table's rows
"""

import jax
import numpy as np

from lf_jax.export.embed_corpus import ExportError, find_checkpoint, restore_state

RANKER_ENTITIES = {  # entity -> (feature that reads the table, id prefix, dataset count key)
    "members": ("member_id", "m", "num_members"),
    "posts": ("post_id", "p", "num_posts"),
}


def _gather_to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class RankerCorpus:
    """The feed ranker's member and post id-table rows (see the module docstring)."""

    family = "feed_ranker"
    metric = "dot_product"

    def __init__(self, config, workdir, step: int | None = None):
        from lf_jax.distributed.mesh import make_mesh
        from lf_jax.train.ranker_model import RankerModel
        from lf_jax.train.step import dense_optimizer

        self.checkpoint_dir, _ = find_checkpoint(workdir, step)
        mesh = make_mesh(dict(config.mesh))
        self.model = RankerModel.from_config(config, mesh, build=False)
        self.collection = self.model.collection
        self.dynamic = self.model.dynamic
        if self.dynamic is not None and jax.process_count() > 1:
            raise ExportError(
                f"dynamic tables {sorted(self.dynamic.specs)}: their export reads the hash "
                f"tables onto one host; run it in one process (this run has "
                f"{jax.process_count()})"
            )
        template = self.model.init_state(dense_optimizer(config.train), config.seed)
        self.state, self.step = restore_state(
            template, self.collection, self.checkpoint_dir, step, self.dynamic
        )
        self._lookup = jax.jit(self.collection.lookup)
        self._pad_to: int | None = None
        self._snapshots: dict[str, dict] = {}

    def dynamic_table(self, entity: str) -> str | None:
        """The dynamic table the entity's rows come from, None for a static one."""
        table = self.collection.features[RANKER_ENTITIES[entity][0]].table
        return table if self.dynamic is not None and table in self.dynamic.specs else None

    def table_state(self) -> dict:
        """{"embedding", "index"}: the restored dynamic tables' state (DynamicTables')."""
        return {"embedding": self.state["embedding"], "index": self.state["dynamic"]}

    def key_names(self, entity: str):
        """keys (uint64 [K]) -> export ids, e.g. 42 -> "p42" for posts."""
        prefix = RANKER_ENTITIES[entity][1]
        return lambda keys: [f"{prefix}{int(key)}" for key in np.asarray(keys, np.uint64)]

    def _snapshot(self, table: str) -> dict:
        if table not in self._snapshots:
            assert self.dynamic is not None
            self._snapshots[table] = self.dynamic.snapshot(self.table_state())[table]
        return self._snapshots[table]

    def entities(self) -> tuple[str, ...]:
        return tuple(RANKER_ENTITIES)

    def dims(self, entity: str) -> int:
        feature = self.collection.features[RANKER_ENTITIES[entity][0]]
        return int(self.collection.tables[feature.table].dim)

    def corpus(self, entity: str) -> tuple[list[str], np.ndarray]:
        """(ids, records): table rows 0..N-1, or a dynamic table's live keys (records:
        positions in its snapshot)."""
        table = self.dynamic_table(entity)
        if table is not None:
            keys = self._snapshot(table)["keys"]
            return self.key_names(entity)(keys), np.arange(keys.size, dtype=np.int64)
        _, prefix, count_key = RANKER_ENTITIES[entity]
        count = int(self.model.meta[count_key])
        return [f"{prefix}{i}" for i in range(count)], np.arange(count, dtype=np.int64)

    def embed(self, entity: str, records) -> np.ndarray:
        """Rows [b, D] of the entity's table for integer ids ``records`` [b], on the mesh
        (of a dynamic table: its snapshot's rows at those positions)."""
        ids = np.asarray(records, np.int64)
        table = self.dynamic_table(entity)
        if table is not None:
            return np.asarray(self._snapshot(table)["rows"], np.float32)[ids]
        devices = self.collection.num_devices
        if self._pad_to is None or ids.size > self._pad_to:  # one compiled shape per run
            self._pad_to = -(-ids.size // devices) * devices
        raw = {
            name: np.full((self._pad_to, spec.max_ids), -1, np.int64)
            for name, spec in self.collection.features.items()
        }
        feature = RANKER_ENTITIES[entity][0]
        raw[feature][: ids.size, 0] = ids
        batch = self.collection.shard_batch(self.collection.preprocess(raw))
        out = self._lookup(self.state["embedding"]["tables"], batch)[feature]
        return _gather_to_host(out)[: ids.size]

    def close(self) -> None:
        pass


class DualEncoderCorpus:
    """The dual encoder's members ("m<id>") and items ("p<id>", feed_logs posts): unit rows.

    Built from ``DualEncoderModel`` (prompts, the run's tokenizer, the model) and the
    checkpoint's parameters; no training task, nothing written to the workdir."""

    family = "dual_encoder"
    metric = "cosine"
    sides = {"members": "member", "items": "item"}

    def __init__(self, config, workdir, step: int | None = None):
        from lf_jax.distributed.mesh import make_mesh
        from lf_jax.train.dual_encoder_model import DualEncoderModel
        from lf_jax.train.step import dense_optimizer, init_train_state

        self.checkpoint_dir, _ = find_checkpoint(workdir, step)
        mesh = make_mesh(dict(config.mesh))
        self.model = DualEncoderModel(config, mesh, workdir, for_training=False)
        tx = dense_optimizer(config.train)
        template = jax.jit(lambda p: init_train_state(p, tx, {}))(self.model.params)
        self.state, self.step = restore_state(template, None, self.checkpoint_dir, step)

    def entities(self) -> tuple[str, ...]:
        return tuple(self.sides)

    def dynamic_table(self, entity: str) -> None:
        """The dual encoder has no dynamic tables."""
        return None

    def dims(self, entity: str) -> int:
        if not self.model.entities[self.sides[entity]]:
            raise ExportError(f"corpus '{entity}' is empty (0 records); nothing to export")
        return self.model.dims[-1]

    def corpus(self, entity: str):
        ids, records = self.model.corpus(self.sides[entity])
        return list(ids), records

    def embed(self, entity: str, records) -> np.ndarray:
        return self.model.embed(self.state["params"], self.sides[entity], records)

    def close(self) -> None:
        pass
