"""Corpus sources for ``lf-jax export``: one small class per model family.

Each class restores a checkpoint onto the mesh and implements the CorpusSource protocol
of embed_corpus.py (entities, dims, corpus, embed). Adding a family whose TrainingTask
offers ``corpus(side)`` and ``embed(state, side, records)`` is one entry in
``embed_corpus.FAMILIES`` pointing at a ``TaskCorpus`` subclass that names its sides.

  * RankerCorpus (feed_ranker): members and posts are rows of the ranker's member and
    post id tables, looked up on the mesh through the embedding collection (the tables
    stay sharded as planned); ids "m<id>" and "p<id>" like the dual encoder's.
  * DualEncoderCorpus (dual_encoder): members and items through the trained tiny Llama
    (``DualEncoderTask.corpus`` / ``embed``), unit-norm rows, cosine.

Example:
    >>> source = RankerCorpus(config, "runs/ranker_tiny", step=None)   # latest checkpoint
    >>> ids, records = source.corpus("posts")        # ["p0", ...], int ids [N]
    >>> source.embed("posts", records[:256]).shape   # (256, 16), the post table's rows
"""

import tempfile

import jax
import numpy as np

from lf_jax.export.embed_corpus import ExportError, find_checkpoint, restore_task_state

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
        from lf_jax.train.loop import build_task

        self.checkpoint_dir, self.step = find_checkpoint(workdir, step)
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.train.ips = False  # loss weights only; export needs no IPS pass over the logs
        # The task writes plan.json into its workdir: keep the training workdir untouched.
        self._scratch = tempfile.TemporaryDirectory(prefix="lf_jax_export_")
        self.task = build_task(config, self._scratch.name)
        self.state = restore_task_state(self.task, self.checkpoint_dir, self.step)
        self.collection = self.task.collection
        self._lookup = jax.jit(self.collection.lookup)
        self._pad_to: int | None = None

    def entities(self) -> tuple[str, ...]:
        return tuple(RANKER_ENTITIES)

    def dims(self, entity: str) -> int:
        feature = self.collection.features[RANKER_ENTITIES[entity][0]]
        return int(self.collection.tables[feature.table].dim)

    def corpus(self, entity: str) -> tuple[list[str], np.ndarray]:
        _, prefix, count_key = RANKER_ENTITIES[entity]
        count = int(self.task.meta[count_key])
        return [f"{prefix}{i}" for i in range(count)], np.arange(count, dtype=np.int64)

    def embed(self, entity: str, records) -> np.ndarray:
        """Rows [b, D] of the entity's table for integer ids ``records`` [b], on the mesh."""
        ids = np.asarray(records, np.int64)
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
        self._scratch.cleanup()


class TaskCorpus:
    """A family whose TrainingTask embeds entities itself: ``task.corpus(side) -> (ids,
    records)`` and ``task.embed(state, side, records) -> [b, D]``. Subclasses set
    ``family``, ``metric`` and ``sides`` ({entity: side}). The task is built on the
    training workdir, so it reuses what training left there (e.g. the tokenizer)."""

    family = ""
    metric = "cosine"
    sides: dict[str, str] = {}

    def __init__(self, config, workdir, step: int | None = None):
        from lf_jax.train.loop import build_task

        self.checkpoint_dir, self.step = find_checkpoint(workdir, step)
        self.task = build_task(config, workdir)
        for method in ("corpus", "embed"):
            if not callable(getattr(self.task, method, None)):
                raise ExportError(
                    f"model family {self.family!r}: its TrainingTask has no "
                    f"'{method}' method, so it cannot be exported"
                )
        self.state = restore_task_state(self.task, self.checkpoint_dir, self.step)
        self._dims: dict[str, int] = {}

    def entities(self) -> tuple[str, ...]:
        return tuple(self.sides)

    def dims(self, entity: str) -> int:
        if entity not in self._dims:
            _, records = self.corpus(entity)
            if len(records) == 0:
                raise ExportError(f"corpus '{entity}' is empty (0 records); nothing to export")
            self._dims[entity] = int(np.shape(self.embed(entity, records[:1]))[-1])
        return self._dims[entity]

    def corpus(self, entity: str):
        ids, records = self.task.corpus(self.sides[entity])
        return list(ids), records

    def embed(self, entity: str, records) -> np.ndarray:
        return np.asarray(self.task.embed(self.state, self.sides[entity], records))

    def close(self) -> None:
        pass


class DualEncoderCorpus(TaskCorpus):
    """The dual encoder's members ("m<id>") and items ("p<id>", feed_logs posts): unit rows."""

    family = "dual_encoder"
    metric = "cosine"
    sides = {"members": "member", "items": "item"}
